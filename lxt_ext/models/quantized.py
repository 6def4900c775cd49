"""Linear layers whose weight is stored quantized, in lxt_ext's transformer composites: bitsandbytes.

bitsandbytes' ``Linear4bit`` (nf4 and fp4) subclasses ``nn.Linear`` but keeps its weight packed (uint8,
two 4-bit codes a byte, with a ``quant_state`` of block scales), so a rule reading ``module.weight``
would read the packed bytes. Its rule here (``DequantizedLinear``) runs bitsandbytes' own forward and
keeps only the layer input; in backward it dequantizes the weight of this one layer, runs the
composite's Linear rule on it (``linear_rule_apply``: the product recomputed, then the rule's backward)
and drops it again. At most one layer's weight is ever held in full precision (never a full-precision
copy of the model); the fused rules accumulate in float32 whatever the weight's dtype.

``Linear8bitLt`` (LLM.int8: its forward also quantizes the input, so the dequantized weight does not
give its output) is refused by name.
"""
import bitsandbytes as bnb
import torch

from ..checks import first_order
from ..core import SwappedForward
from ..layers import UnsupportedLayerError
from ..transformer.convention import linear_rule_apply
from . import adapter

__all__ = ['DequantizedLinear', 'dequantized_weight']


def dequantized_weight(module):
    """The full-precision weight (out, in) of a bitsandbytes ``Linear4bit``, in its original dtype."""
    weight = module.weight
    if getattr(weight, 'quant_state', None) is None:
        raise UnsupportedLayerError(
            f'{type(module).__name__} holds no quantized weight yet (bitsandbytes quantizes when the layer is '
            f'moved to a device, e.g. .to("cpu")); quantize it before registering a composite')
    return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)


class _DequantizedRule(torch.autograd.Function):
    """bitsandbytes' forward; in backward, ``rule`` on this layer's dequantized weight (input kept only)."""

    @staticmethod
    def forward(ctx, x, rule, module, original):
        ctx.save_for_backward(x)
        ctx.rule, ctx.module = rule, module
        return original(x)

    @staticmethod
    @first_order
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        weight = dequantized_weight(ctx.module)
        with torch.enable_grad():
            leaf = x.detach().to(weight.dtype).requires_grad_()
            output = linear_rule_apply(ctx.rule, leaf, weight, ctx.module.bias)
            (grad_input,) = torch.autograd.grad(output, leaf, grad.to(output.dtype))
        return grad_input.to(x.dtype), None, None, None


class DequantizedLinear(SwappedForward):
    """The composite's Linear rule (``linear_rule``, a template in the Gradient x Input convention) on a
    bitsandbytes ``Linear4bit``, applied to its weight dequantized one layer at a time in backward."""

    def __init__(self, linear_rule):
        super().__init__()
        if linear_rule is None:
            raise ValueError('quantized Linear layers need the composite\'s Linear rule (Options.linear)')
        self.linear_rule = linear_rule

    def copy(self):
        copy = super().copy()
        copy.linear_rule = self.linear_rule.copy()
        return copy

    def prepare(self, module):
        if not isinstance(module, bnb.nn.Linear4bit):
            raise UnsupportedLayerError(f'DequantizedLinear takes bitsandbytes Linear4bit, not {type(module).__name__}')
        if getattr(module.weight, 'quant_state', None) is None:
            dequantized_weight(module)  # raises the clear error

    def apply(self, module, original, input, args, kwargs):
        return _DequantizedRule.apply(input, self.linear_rule, module, lambda x: original(x, *args, **kwargs))


class _Refused(SwappedForward):
    """Refuses a quantized layer no rule here covers, by name."""

    def __init__(self, reason):
        super().__init__()
        self.reason = reason

    def prepare(self, module):
        raise UnsupportedLayerError(f'{type(module).__module__}.{type(module).__qualname__}: {self.reason}')


@adapter(bnb.nn.Linear4bit)
def _linear_4bit(module, options):
    return DequantizedLinear(None if options.linear is None else options.linear.copy())


@adapter(bnb.nn.Linear8bitLt)
def _linear_8bit(module, options):
    return _Refused('LLM.int8 quantizes the layer input as well, so no rule on a dequantized weight gives its '
                    'output; lxt_ext does not cover 8-bit bitsandbytes layers (use 4-bit, or dequantize the model)')
