"""LRP-epsilon on Linear layers from the kept output, in the Gradient x Input convention
(``lxt_ext.transformer``; ViTEpsilon's Linear rule)."""
import torch

from .. import ops
from ..checks import first_order
from ..core import SwappedForward
from ..layers import UnsupportedLayerError

__all__ = ['OutputEpsilon']


class _EpsilonFromOutput(torch.autograd.Function):
    """``y = x W^T + b``; backward ``g_in = W^T (g y / stab(y)) = (g |y| / (|y| + eps)) W``.
    Keeps only ``y`` (and W): no product is recomputed, and the next rule often keeps ``y`` anyway.
    ``keeps_output``: the operation rules give the node a copy of ``y`` (``output_copy``) before model code changes
    ``y`` in place (NaFlexViT adds its position embedding so), and backward takes that copy."""
    keeps_output = True

    @staticmethod
    def forward(ctx, x, weight, epsilon, original):
        output = original(x)
        if not torch.compiler.is_compiling() and output._is_view():
            # a view (of an input returned as it is) would forbid model code's in-place changes (NaFlexViT adds its
            # position embedding in place)
            output = output.clone()
        ctx.save_for_backward(output)
        ctx.weight, ctx.epsilon = weight, epsilon
        return output

    @staticmethod
    @first_order
    def backward(ctx, grad):
        output = ctx.output_copy if hasattr(ctx, 'output_copy') else ctx.saved_tensors[0]
        weight = ctx.weight
        ratio = ops.identity_backward(output, output, grad, ctx.epsilon)  # the identity rule's ratio with h = x = y
        return ratio.to(weight.dtype) @ weight, None, None, None


class OutputEpsilon(SwappedForward):
    """LRP-epsilon on ``nn.Linear`` in the Gradient x Input convention, computed from the layer's
    output: ``g_in = W^T (g_out * y / stab(y))`` needs ``y`` only, not the input. Same relevance as
    ``lxt_ext.rules.Epsilon(epsilon, convention='gradient_x_input')``, which keeps the input and
    recomputes ``y`` in backward; this keeps ``y``, which in a ViT the next rule keeps anyway
    (GELU's input, the attention's q, k, v), and is smaller than the input of the MLP's second layer.
    An in-place change of ``y`` after the layer makes the backward raise (autograd's version check).

    Parameters
    ----------
    epsilon : float, optional
        The epsilon of ``stab(y) = y + epsilon * (sign(y) + [y == 0])`` (default 1e-6).
    """
    keeps_output = True

    def __init__(self, epsilon=1e-6):
        super().__init__()
        self.epsilon = float(epsilon)

    def prepare(self, module):
        if not isinstance(module, torch.nn.Linear):
            raise UnsupportedLayerError(f'OutputEpsilon takes nn.Linear modules, not {type(module).__name__}')

    def apply(self, module, original, input, args, kwargs):
        return _EpsilonFromOutput.apply(input, module.weight, self.epsilon, lambda x: original(x, *args, **kwargs))

    def linear(self, x, weight, bias):
        """``F.linear(x, weight, bias)`` with this rule in backward (a Linear map not called as a module)."""
        return _EpsilonFromOutput.apply(x, weight, self.epsilon,
                                        lambda input: torch.nn.functional.linear(input, weight, bias))
