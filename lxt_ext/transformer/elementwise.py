"""Element-wise rules in the Gradient x Input convention (``lxt_ext.transformer``).

- element-wise activations ``h = f(x)``: identity rule, ``g_in = g_out * f(x) / stab(x)``;
- element-wise products ``p = a * b`` (gated MLPs): uniform rule, ``g_a = g_out * b / 2``, ``g_b = g_out * a / 2``;
- dropout: off while registered.

``stab(z) = z + eps * (sign(z) + [z == 0])`` is ``zennit.core.stabilize``; ``eps`` is the composite's
``input_stabilizer``. Each rule saves only what its backward needs.
"""
import torch

from .. import ops
from .._docstrings import shared_parameters
from ..checks import first_order
from ..core import SHARED, RuleHook, SwappedForward

__all__ = ['ActivationIdentity', 'DropoutOff', 'identity_rule', 'uniform_product']


class _IdentityRule(torch.autograd.Function):
    """``h = f(x)``; backward ``g_in = g_out * f(x) / stab(x)`` with ``f(x)`` recomputed, so only
    ``x`` is saved (LXT saves the ratio: the same memory, plus a division in every forward); the rest
    is ``lxt_ext.ops.identity_backward`` (one pass of the extension op)."""

    @staticmethod
    def forward(ctx, x, fn, stabilizer):
        output = fn(x)
        if not isinstance(output, torch.Tensor) or output.shape != x.shape:
            raise TypeError(f'the identity rule needs an element-wise function (output of the input\'s shape); '
                            f'{fn} is not')
        ctx.save_for_backward(x)
        ctx.fn, ctx.stabilizer = fn, stabilizer
        return output

    @staticmethod
    @first_order
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return ops.identity_backward(ctx.fn(x), x, grad, ctx.stabilizer), None, None


# The default stabilizer of the divisions by a tensor in the Gradient x Input convention (the identity rule's
# g * f(x) / stab(x), the output convention's R / stab(y)): small enough to leave every ratio exact in float32.
INPUT_STABILIZER = 1e-10


@shared_parameters('input_stabilizer')
def identity_rule(fn, x, input_stabilizer=INPUT_STABILIZER):
    """``fn(x)`` for an element-wise ``fn``, with the identity rule in backward (``input_stabilizer``
    stabilises the division by ``x``).

    The output is marked recomputable (``lxt_ext.core.SharedTensors``): a fused rule consuming it
    unchanged (the next Linear of an MLP) keeps ``x``, which this rule keeps anyway, and recomputes
    ``fn(x)`` in backward instead of keeping a second activation-sized tensor.

    Parameters
    ----------
    fn : callable
        The element-wise function ``f`` (its output has the input's shape, else ``TypeError``).
    x : torch.Tensor
        The input.

    Returns
    -------
    torch.Tensor
        ``fn(x)``; backward ``g_in = g_out * f(x) / stab(x)``.
    """
    output = _IdentityRule.apply(x, fn, input_stabilizer)
    SHARED.mark_recomputable(output, x, fn)
    return output


@shared_parameters('input_stabilizer')
class ActivationIdentity(SwappedForward):
    """The identity rule on an element-wise activation module (``nn.GELU``, ``nn.SiLU``, ``nn.ReLU``,
    ``nn.Tanh``, ``nn.Sigmoid``, timm's and transformers' activation modules): the relevance of
    each output goes to the input it was computed from."""

    def __init__(self, input_stabilizer=INPUT_STABILIZER):
        super().__init__()
        self.input_stabilizer = input_stabilizer

    def apply(self, module, original, input, args, kwargs):
        if getattr(module, 'inplace', False):
            # an in-place activation would overwrite the input the backward needs
            def fn(x):
                return original(x.clone(), *args, **kwargs)
        else:
            def fn(x):
                return original(x, *args, **kwargs)
        return identity_rule(fn, input, self.input_stabilizer)


class _UniformProduct(torch.autograd.Function):
    """``p = a * b``; backward ``g_a = g b / 2``, ``g_b = g a / 2`` (half the relevance to each)."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a * b

    @staticmethod
    @first_order
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        # addcmul onto a broadcast zero scales in the same pass as the product: one pass per gradient
        zero, share = grad.new_zeros(()), ops.ATTNLRP_FACTORS['uniform_share']
        grad_a = torch.addcmul(zero, grad, b, value=share).sum_to_size(a.shape) if ctx.needs_input_grad[0] else None
        grad_b = torch.addcmul(zero, grad, a, value=share).sum_to_size(b.shape) if ctx.needs_input_grad[1] else None
        return grad_a, grad_b


def uniform_product(a, b):
    """``a * b`` (broadcasting) with the uniform rule in backward: ``g_a = g_out * b / 2``, ``g_b = g_out * a / 2``
    (each summed to its factor's shape).

    Parameters
    ----------
    a, b : torch.Tensor
        The factors.

    Returns
    -------
    torch.Tensor
        ``a * b``.
    """
    return _UniformProduct.apply(a, b)


class DropoutOff(RuleHook):
    """Dropout modules return their input while registered (also in ``train()`` mode, which
    gradient checkpointing in transformers requires)."""
    checked = False

    def attach(self, module):
        plain, hook = module.forward, self

        def forward(input, *args, **kwargs):
            return input if hook.active else plain(input, *args, **kwargs)

        self.swap_forward(module, forward)
