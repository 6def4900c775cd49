"""Linear layers whose weight is stored quantized, in lxt_ext's transformer composites.

A rule reading ``module.weight`` of such a layer would read packed bytes (bitsandbytes' ``Linear4bit``
subclasses ``nn.Linear`` but keeps two 4-bit codes a byte) or a tensor subclass the fused ops cannot
take (torchao's ``Int8Tensor`` and kin inside a plain ``nn.Linear``). ``DequantizedLinear`` runs the
layer's own quantized forward and keeps only the layer input; in backward it dequantizes the weight of
this one layer, runs the composite's Linear rule on it (``linear_rule_apply``: the product recomputed,
then the rule's backward) and drops it again. At most one layer's weight is ever held in full
precision, never a full-precision copy of the model; the fused rules accumulate in float32 whatever the
weight's dtype. Tables: ``bitsandbytes.py`` (``Linear4bit``; ``Linear8bitLt`` refused) and ``torch_nn.py``
(an ``nn.Linear`` whose weight is a tensor subclass with ``dequantize()``: torchao).
"""
import torch

from .. import checks
from ..checks import first_order
from ..core import SwappedForward
from ..layers import UnsupportedLayerError
from ..transformer.convention import linear_rule_apply

__all__ = ['DequantizedLinear', 'dequantized_weight', 'is_quantized']


def is_quantized(weight):
    """Whether ``weight`` is a quantized tensor subclass that dequantizes itself (torchao's).

    Parameters
    ----------
    weight : object
        A layer's weight.

    Returns
    -------
    bool
        True for a tensor subclass (not ``torch.Tensor`` or ``nn.Parameter`` itself) with a ``dequantize()``.
    """
    return (isinstance(weight, torch.Tensor) and type(weight) not in (torch.Tensor, torch.nn.Parameter)
            and callable(getattr(weight, 'dequantize', None)))


def dequantized_weight(module):
    """The full-precision weight (out, in) of a quantized Linear layer, in its original dtype.

    Parameters
    ----------
    module : torch.nn.Module
        A bitsandbytes ``Linear4bit`` (quantized already) or a Linear layer whose weight :func:`is_quantized`;
        another raises ``UnsupportedLayerError``.

    Returns
    -------
    torch.Tensor
        A new tensor: the dequantized weight.
    """
    weight = module.weight
    if type(weight).__name__ == 'Params4bit':  # bitsandbytes
        import bitsandbytes
        if weight.quant_state is None:
            raise UnsupportedLayerError(
                f'{type(module).__name__} holds no quantized weight yet (bitsandbytes quantizes when the layer is '
                f'moved to a device, e.g. .to("cpu")); quantize it before registering a composite')
        return bitsandbytes.functional.dequantize_4bit(weight.data, weight.quant_state)
    if is_quantized(weight):
        return weight.dequantize()
    raise UnsupportedLayerError(f'{type(module).__name__}: its weight ({type(weight).__name__}) is not one lxt_ext '
                                f'can dequantize')


class _DequantizedRule(torch.autograd.Function):
    """The layer's quantized forward; in backward, ``rule`` on its dequantized weight (input kept only)."""

    @staticmethod
    def forward(ctx, x, rule, module, original):
        ctx.save_for_backward(x)
        ctx.rule, ctx.module = rule, module
        return original(x)

    @staticmethod
    @first_order
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        # in the input's dtype: bitsandbytes may dequantize in another (bfloat16 scales after its CPU repacking
        # of a float32-compute layer) while the bias stays in the model's
        bias = ctx.module.bias
        weight = dequantized_weight(ctx.module).to(x.dtype)
        with torch.enable_grad():
            leaf = x.detach().requires_grad_()
            output = linear_rule_apply(ctx.rule, leaf, weight, None if bias is None else bias.to(x.dtype))
            (grad_input,) = torch.autograd.grad(output, leaf, grad.to(output.dtype))
        return grad_input, None, None, None


class DequantizedLinear(SwappedForward):
    """The composite's Linear rule (``linear_rule``, a template in the Gradient x Input convention) on a
    quantized Linear layer, applied to its weight dequantized one layer at a time in backward.

    Parameters
    ----------
    linear_rule : zennit.core.Hook
        The composite's Linear rule (``Options.linear``), run by ``linear_rule_apply``; None raises ``ValueError``.
    """
    checked = False  # the layer's input and output are checked by the rules around it; its weight is not a float

    def __init__(self, linear_rule):
        super().__init__()
        if linear_rule is None:
            raise ValueError('quantized Linear layers need the composite\'s Linear rule (Options.linear)')
        self.linear_rule = linear_rule

    def register(self, module):
        # a layer this rule cannot dequantize raises here, by name; the weight is checked for NaN/Inf
        # dequantized, and hidden from SwappedForward's check of the parameters (a tensor subclass may not sum)
        checks.finite(dequantized_weight(module), f'the dequantized weight of {checks.where(self, module)}')
        parameters = dict(module._parameters)
        module._parameters.pop('weight')
        try:
            return super().register(module)
        finally:
            module._parameters.clear()
            module._parameters.update(parameters)  # the same objects in the same order

    def apply(self, module, original, input, args, kwargs):
        return _DequantizedRule.apply(input, self.linear_rule, module, lambda x: original(x, *args, **kwargs))
