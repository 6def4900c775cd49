"""The rule of a layer ``y = W x + b``: ``ProductRule`` keeps the layer input (``_FusedLayer``) and maps the
output relevance to the input relevance without an autograd graph; ``FusedRule`` does so with the one extension
op ``torch.ops.lxt_ext.lrp_backward`` and fixed rule data (a rule code from ``lxt_ext.ops.RULES``, its
parameters and how the bias enters the two denominators; ``csrc/rules/`` holds the math).

``convention`` says what the gradient slot carries: ``'explicit'`` (zennit's: relevance, ``R_in = x * W^T S``)
or ``'gradient_x_input'`` (relevance per unit of the tensor, used inside lxt_ext's transformer composites:
``R = y * g_out`` in and ``g_in`` out, with ``x * g_in`` the input relevance).
"""
import torch
from zennit.core import Stabilizer

from .. import ops
from ..checks import first_order
from ..layers import LayerSpec, check_input
from .hooks import SwappedForward
from .shared import SHARED

__all__ = ['CONVENTIONS', 'LOW_PRECISION', 'ProductRule', 'FusedRule', 'epsilon_of', 'zeroes_bias']

CONVENTIONS = ('explicit', 'gradient_x_input')
# Half-precision dtypes whose element-wise rule math runs in float32.
LOW_PRECISION = (torch.float16, torch.bfloat16)


def epsilon_of(value, argument):
    """The epsilon of a zennit stabilizer argument (a number or a plain ``zennit.core.Stabilizer``).

    Parameters
    ----------
    value : float or zennit.core.Stabilizer
        The argument; a ``Stabilizer`` with ``clip`` or ``norm_scale``, or another callable, raises
        ``NotImplementedError``, anything else that is not a number ``TypeError``.
    argument : str
        The argument's name, for the error message.

    Returns
    -------
    float
        The epsilon of ``stab(z) = z + epsilon * (sign(z) + [z == 0])``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, Stabilizer)):
        if callable(value):
            raise NotImplementedError(
                f'lxt_ext rules take {argument} as a number (or a zennit Stabilizer without clip/norm_scale); '
                f'a custom callable stabilizer is only supported by zennit\'s own rules'
            )
        raise TypeError(f'Value {value} is not a valid stabilizer!')
    if isinstance(value, Stabilizer):
        if value.clip or value.norm_scale:
            raise NotImplementedError(
                f'lxt_ext rules support zennit Stabilizers without clip and norm_scale only, got {vars(value)}'
            )
        value = value.epsilon
    return float(value)


def zeroes_bias(zero_params):
    """zennit's ``zero_params`` for a product layer: only the bias can be zeroed meaningfully.

    Parameters
    ----------
    zero_params : str or list of str or None
        Parameter names; a name other than ``'bias'`` raises ``NotImplementedError``.

    Returns
    -------
    bool
        Whether the bias is left out of the rule's denominators.
    """
    if zero_params is None:
        return False
    names = [zero_params] if isinstance(zero_params, str) else list(zero_params)
    unknown = sorted(set(names) - {'bias'})
    if unknown:
        raise NotImplementedError(
            f'lxt_ext rules can zero the bias only, not {unknown}; use zennit\'s rule for that layer'
        )
    return 'bias' in names


class ProductRule(SwappedForward):
    """A rule for a layer ``y = W x + b``: ``_FusedLayer`` keeps the layer input, and ``backward_op`` maps
    the output relevance to the input relevance without an autograd graph.

    ``fold``, set by lxt_ext's composites before registering, is a ``batch_norm_fold.BatchNormFold``
    where a merged BatchNorm's scale is left out of the module's weight: the layer's weight is then
    ``fold(module.weight)``, formed for each product and not kept."""
    fold = None

    def prepare(self, module):
        self._spec = LayerSpec.of(module)

    def plain_forward(self, module, original):
        if self.fold is None:
            return original
        fold, spec = self.fold, self._spec

        def folded(input):
            return spec.product(input, fold(module.weight), [0] * len(spec.stride), module.bias)
        return folded

    def apply(self, module, original, input, args, kwargs):
        check_input(module, input)
        return _FusedLayer.apply(input, module.weight, module.bias, self, self._spec, self.fold, original, args,
                                 kwargs)

    def backward_op(self, x, weight, bias, grad, spec, output_padding):
        raise NotImplementedError


class FusedRule(ProductRule):
    """A rule whose backward is ``torch.ops.lxt_ext.lrp_backward`` with fixed rule data: ``rule_name`` (a name
    of ``lxt_ext.ops.RULES``), its parameters, and ``rule_biases``.

    Parameters
    ----------
    epsilon : float or zennit.core.Stabilizer, optional
        The epsilon of the stabilizer ``stab(z) = z + epsilon * (sign(z) + [z == 0])`` (default 1e-6; see
        :func:`epsilon_of`).
    gamma, alpha, beta : float, optional
        The rule's parameters, passed to the op (default 0; each rule reads those of its formula).
    zero_params : str or list of str, optional
        zennit's ``zero_params``: only ``'bias'`` (see :func:`zeroes_bias`).
    convention : {'explicit', 'gradient_x_input'}, optional
        What the gradient slot carries (see the module doc; default ``'explicit'``).
    """
    rule_name = None

    def __init__(self, epsilon=1e-6, gamma=0., alpha=0., beta=0., zero_params=None, convention='explicit'):
        super().__init__()
        if convention not in CONVENTIONS:
            raise ValueError(f'convention must be one of {CONVENTIONS}, got {convention!r}')
        self.epsilon = epsilon
        self.gamma = float(gamma)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.zero_params = zero_params
        self.convention = convention
        self._epsilon = epsilon_of(epsilon, 'the stabilizer')
        self._zero_bias = zeroes_bias(zero_params)

    def rule_biases(self, bias):
        """``(b1, b2)``: the bias as it enters the rule's first and second denominator."""
        raise NotImplementedError

    def linear(self, x, weight, bias):
        """``F.linear(x, weight, bias)`` with this rule in backward (a Linear map not called as a module)."""
        def original(input):
            return torch.nn.functional.linear(input, weight, bias)
        return _FusedLayer.apply(x, weight, bias, self, _LINEAR, None, original, (), {})

    def convolution(self, x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, transposed=False,
                    output_padding=0):
        """A convolution called functionally (``F.conv2d``'s arguments; ``transposed`` for ``F.conv_transpose*``)
        with this rule in backward: a convolution module's own forward (timm's ``Conv2dSame``, weight-standardised
        convolutions) or model code. Padding ``'same'`` that is uneven pads the input's far side first, as torch
        does."""
        dims = weight.dim() - 2

        def spread(value):
            return tuple(value) if isinstance(value, (tuple, list)) else (int(value),) * dims
        stride, dilation = spread(stride), spread(dilation)
        if padding == 'valid':
            padding = 0
        elif padding == 'same':
            totals = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:])]
            extra = [side for total in reversed(totals) for side in (0, total % 2)]
            if any(extra):
                x = torch.nn.functional.pad(x, extra)
            padding = [total // 2 for total in totals]
        spec = LayerSpec(linear=False, transposed=bool(transposed), stride=stride, padding=spread(padding),
                         dilation=dilation, groups=int(groups))
        output_padding = list(spread(output_padding))

        def original(input):
            return torch.ops.aten.convolution(input, weight, bias, spec.stride, spec.padding, spec.dilation,
                                              spec.transposed, output_padding, spec.groups)
        return _FusedLayer.apply(x, weight, bias, self, spec, None, original, (), {})

    def backward_op(self, x, weight, bias, grad, spec, output_padding):
        code = ops.RULES[self.rule_name if self.active else 'gradient']
        channels = grad.shape[-1] if spec.linear else grad.shape[1]
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        if bias is None:
            bias = torch.zeros(channels, dtype=acc, device=x.device)
        else:
            bias = bias.detach().to(acc)
        b1, b2 = (torch.zeros_like(bias),) * 2 if self._zero_bias else self.rule_biases(bias)
        return ops.lib.lrp_backward(
            x, weight.detach(), grad, bias, b1, b2, code, self._epsilon, self.gamma, self.alpha, self.beta,
            self.convention == 'explicit', spec.linear, spec.transposed, list(spec.stride), list(spec.padding),
            list(spec.dilation), output_padding, spec.groups,
        )


_LINEAR = LayerSpec(linear=True)


class _FusedLayer(torch.autograd.Function):
    """The layer's own forward; the rule's backward. Saves the input, weight and bias only (and, for a
    folded BatchNorm, forms the weight again in backward)."""

    @staticmethod
    def forward(ctx, input, weight, bias, hook, spec, fold, original, args, kwargs):
        output = original(input, *args, **kwargs)
        source, ctx.recompute = input, None
        recomputable = SHARED.recomputable(input)
        if recomputable is not None:
            source, ctx.recompute = recomputable
        else:
            SHARED.keep(input)
        ctx.save_for_backward(source, weight, bias)
        ctx.hook, ctx.spec, ctx.fold = hook, spec, fold
        ctx.output_padding = spec.output_padding(weight, input.shape, output.shape)
        return output

    @staticmethod
    @first_order
    def backward(ctx, grad):
        x, weight, bias = ctx.saved_tensors
        if ctx.fold is not None:
            weight = ctx.fold(weight)
        if ctx.recompute is not None:
            x = ctx.recompute(x)
        spec = ctx.spec
        unbatched = not spec.linear and x.dim() == weight.dim() - 1
        if unbatched:
            x, grad = x[None], grad[None]
        grad_input = ctx.hook.backward_op(x, weight, bias, grad.to(x.dtype), spec, ctx.output_padding)
        if unbatched:
            grad_input = grad_input[0]
        return grad_input, None, None, None, None, None, None, None, None
