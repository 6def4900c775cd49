"""zennit rules whose backward is one fused lxt_ext op, as declarations over ``lxt_ext.core``.

``Epsilon``, ``Gamma``, ``ZPlus`` and ``AlphaBeta`` take zennit's arguments and give zennit's
relevance; they differ in how: registering swaps the module's ``forward`` for an autograd Function
that keeps only the layer input and, in backward, calls ``torch.ops.lxt_ext.lrp_backward`` (the
layer products through ATen, the rule's element-wise work in lxt_ext's kernels). zennit's
``BasicHook`` instead re-runs the layer once per modifier and back-propagates through every copy.

Each fused rule is data for that one mechanism (``lxt_ext.core.FusedRule``): a rule name, its
parameters and how the bias enters the rule's two denominators. ``ZBox``, ``Flat`` (first layers),
``Norm`` (sums, average pooling) and ``Pass`` use the same swapped forward with a few PyTorch products
in backward instead of the op; like the fused rules they keep at most the input.
"""
import torch
from zennit.core import Stabilizer, expand
from zennit.layer import Sum

from ._docstrings import shared_parameters
from .checks import first_order
from .core import SHARED, FusedRule, ProductRule, SwappedForward, zeroes_bias
from .core.products import _FusedLayer
from .layers import check_input

__all__ = ['Pass', 'Epsilon', 'Gamma', 'AlphaBeta', 'ZPlus', 'ZBox', 'Flat', 'Norm']


class Pass(SwappedForward):
    """zennit's Pass rule (relevance goes through an element-wise module unchanged), without the
    input clone and backward hooks zennit's version costs on every activation and BatchNorm.

    It keeps nothing for backward, so, unlike the fused rules, it cannot turn back into the plain
    gradient when made inactive only between the forward and the backward pass; inactive during
    the forward pass (``with composite.inactive(): ...`` around both) is plain as in zennit.

    Its input and relevance are not checked for NaN/Inf: they pass unchanged to and from the rules
    around it, which check them (a full pass over every activation and BatchNorm: see docs/benchmarks.md)."""
    checked = False

    def apply(self, module, original, input, args, kwargs):
        return _PassThrough.apply(input, original, args, kwargs)


class _PassThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, original, args, kwargs):
        output = original(input, *args, **kwargs)
        if not isinstance(output, torch.Tensor) or output.shape != input.shape:
            raise TypeError(f'the Pass rule needs an element-wise module (one output of the input\'s shape); '
                            f'{type(original.__self__).__name__ if hasattr(original, "__self__") else original} '
                            f'is not')
        return output

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None


@shared_parameters('rule_zero_params', 'convention')
class Epsilon(FusedRule):
    """LRP-epsilon: ``R_in = x * W^T (R / stab(W x + b))``, as ``zennit.rules.Epsilon``.

    Parameters
    ----------
    epsilon : float or zennit.core.Stabilizer, optional
        The stabilizer ``eps`` of ``stab(z) = z + eps * (sign(z) + [z == 0])`` (default 1e-6).
    """
    rule_name = 'epsilon'

    def __init__(self, epsilon=1e-6, zero_params=None, *, convention='explicit'):
        super().__init__(epsilon=epsilon, zero_params=zero_params, convention=convention)

    def rule_biases(self, bias):
        return bias, torch.zeros_like(bias)


@shared_parameters('rule_stabilizer', 'rule_zero_params', 'convention')
class Gamma(FusedRule):
    """Generalized LRP-gamma, as ``zennit.rules.Gamma``: weights ``W + gamma W+`` for positive and
    ``W + gamma W-`` for negative contributions, biases ``b + gamma b+`` and ``b + gamma b-``.

    Parameters
    ----------
    gamma : float, optional
        How much the positive (for positive outputs) and negative (for negative outputs) contributions
        are favoured (default 0.25; 0 is the epsilon rule with ``stabilizer`` as epsilon).
    """
    rule_name = 'gamma'

    def __init__(self, gamma=0.25, stabilizer=1e-6, zero_params=None, *, convention='explicit'):
        super().__init__(epsilon=stabilizer, gamma=gamma, zero_params=zero_params, convention=convention)
        self.stabilizer = stabilizer

    def rule_biases(self, bias):
        return bias + self.gamma * bias.clamp(min=0), bias + self.gamma * bias.clamp(max=0)


@shared_parameters('rule_stabilizer', 'rule_zero_params', 'convention')
class AlphaBeta(FusedRule):
    """LRP-alpha-beta, as ``zennit.rules.AlphaBeta``: ``alpha`` times the positive minus ``beta``
    times the negative contributions, each normalized by its own sum (biases ``b+`` and ``b-``).

    Parameters
    ----------
    alpha : float, optional
        Weight of the positive contributions (default 2).
    beta : float, optional
        Weight of the negative contributions (default 1); both must be non-negative and
        ``alpha - beta`` must be 1 (``ValueError`` otherwise, zennit's messages).
    """
    rule_name = 'alpha_beta'

    def __init__(self, alpha=2., beta=1., stabilizer=1e-6, zero_params=None, *, convention='explicit'):
        if alpha < 0 or beta < 0:
            raise ValueError("Both alpha and beta parameters must be positive!")
        if (alpha - beta) != 1.:
            raise ValueError("The difference of parameters alpha - beta must equal 1!")
        super().__init__(epsilon=stabilizer, alpha=alpha, beta=beta, zero_params=zero_params, convention=convention)
        self.stabilizer = stabilizer

    def rule_biases(self, bias):
        return bias.clamp(min=0), bias.clamp(max=0)


@shared_parameters('rule_stabilizer', 'rule_zero_params', 'convention')
class ZPlus(AlphaBeta):
    """LRP-z+, as ``zennit.rules.ZPlus``: alpha-beta with ``alpha=1, beta=0``.

    Parameters
    ----------
    """

    def __init__(self, stabilizer=1e-6, zero_params=None, *, convention='explicit'):
        super().__init__(alpha=1., beta=0., stabilizer=stabilizer, zero_params=zero_params, convention=convention)


@shared_parameters('rule_zero_params')
class ZBox(ProductRule):
    """LRP-ZBox, as ``zennit.rules.ZBox``: ``R_in = x W^T s - low W+^T s - high W-^T s`` with
    ``s = R / stab(W x - W+ low - W- high)``. zennit's three biases ``b - b+ - b-`` cancel, so the bias
    (zeroed or not) does not enter. Backward takes three forward and two input-gradient products
    (``W^T s = W+^T s + W-^T s``) from the kept input alone.

    Parameters
    ----------
    low : float or torch.Tensor
        The lowest value of the input (a tensor broadcast against the input, per pixel or channel).
    high : float or torch.Tensor
        The highest value of the input, likewise.
    stabilizer : float or zennit.core.Stabilizer, optional
        The stabilizer of the denominators, ``stab(z) = z + stabilizer * (sign(z) + [z == 0])`` as in
        zennit (default 1e-6); any zennit stabilizer.
    """

    def __init__(self, low, high, stabilizer=1e-6, zero_params=None):
        super().__init__()
        self.low, self.high = low, high
        self.stabilizer = stabilizer
        self.zero_params = zero_params
        self._stabilize = Stabilizer.ensure(stabilizer)
        zeroes_bias(zero_params)

    def apply(self, module, original, input, args, kwargs):
        check_input(module, input)
        # zennit broadcasts the bounds against the input as the module gets it (batched or not): views only
        bounds = _BoundedZBox(self, *(expand(b, input.shape, cut_batch_dim=True) for b in (self.low, self.high)))
        return _FusedLayer.apply(input, module.weight, module.bias, bounds, self._spec, self.fold, original, args,
                                 kwargs)


class _BoundedZBox:
    """One forward call's ZBox: the rule with its bounds expanded to that call's input."""

    def __init__(self, rule, low, high):
        self.rule, self.low, self.high = rule, low, high

    def backward_op(self, x, weight, bias, grad, spec, output_padding):
        if not self.rule.active:
            return spec.input_product(grad, weight, x, output_padding)
        low, high = self.low.to(x).expand(x.shape), self.high.to(x).expand(x.shape)
        w_pos, w_neg = weight.clamp(min=0), weight.clamp(max=0)
        z = spec.product(x, weight, output_padding)
        z -= spec.product(low, w_pos, output_padding)
        z -= spec.product(high, w_neg, output_padding)
        s = grad / self.rule._stabilize(z)
        del z
        relevance = (x - low) * spec.input_product(s, w_pos, x, output_padding)
        relevance += (x - high) * spec.input_product(s, w_neg, x, output_padding)
        return relevance


@shared_parameters('rule_zero_params')
class Flat(ProductRule):
    """LRP-Flat, as ``zennit.rules.Flat``: the layer with all weights one, inputs one and no bias,
    ``R_in = 1^T (R / stab(1 1))`` (two products from the input's shape alone).

    Parameters
    ----------
    stabilizer : float or zennit.core.Stabilizer, optional
        The stabilizer of the denominators, ``stab(z) = z + stabilizer * (sign(z) + [z == 0])`` as in
        zennit (default 1e-6); any zennit stabilizer.
    """

    def __init__(self, stabilizer=1e-6, zero_params=None):
        super().__init__()
        self.stabilizer = stabilizer
        self.zero_params = zero_params
        self._stabilize = Stabilizer.ensure(stabilizer)
        zeroes_bias(zero_params)

    def backward_op(self, x, weight, bias, grad, spec, output_padding):
        if not self.active:
            return spec.input_product(grad, weight, x, output_padding)
        ones = torch.ones_like(weight)
        s = grad / self._stabilize(spec.product(torch.ones_like(x), ones, output_padding))
        return spec.input_product(s, ones, x, output_padding)


class Norm(SwappedForward):
    """zennit's Norm rule for a parameter-free linear module ``y = f(x)`` (zennit's ``Sum``, average
    pooling): ``R_in = x * J_f^T (R / stab(y))``. Keeps only the input, and of a ``Sum``'s stacked input
    only the slices no product rule keeps already; backward re-runs ``f`` once for ``J_f^T``. (zennit's
    keeps a clone of the input and the output relevance until the hook is removed.)

    Parameters
    ----------
    stabilizer : float or zennit.core.Stabilizer, optional
        The stabilizer of the denominators, ``stab(z) = z + stabilizer * (sign(z) + [z == 0])`` as in
        zennit (default 1e-6); any zennit stabilizer.
    """

    def __init__(self, stabilizer=1e-6):
        super().__init__()
        self.stabilizer = stabilizer
        self._stabilize = Stabilizer.ensure(stabilizer)

    def apply(self, module, original, input, args, kwargs):
        sum_dim = module.dim if isinstance(module, Sum) else None
        return _NormLayer.apply(input, self, original, args, kwargs, sum_dim)


class _NormLayer(torch.autograd.Function):
    """The module's own forward; Norm's backward. Saves the input, or a ``Sum``'s input as its slices
    along the summed dimension: a slice equal to a tensor kept by a product rule shares that tensor."""

    @staticmethod
    def forward(ctx, input, hook, original, args, kwargs, sum_dim):
        ctx.hook, ctx.original, ctx.args, ctx.kwargs = hook, original, args, kwargs
        ctx.sum_dim = None
        if sum_dim is not None:
            slices = input.unbind(sum_dim)
            shared = [SHARED.kept_equal(part) for part in slices]
            if any(part is not None for part in shared):
                ctx.sum_dim = sum_dim
                ctx.save_for_backward(*(kept if kept is not None else part.contiguous()
                                        for kept, part in zip(shared, slices)))
        if ctx.sum_dim is None:
            ctx.save_for_backward(input)
        return original(input, *args, **kwargs)

    @staticmethod
    @first_order
    def backward(ctx, grad):
        saved = ctx.saved_tensors
        x = saved[0] if ctx.sum_dim is None else torch.stack(saved, ctx.sum_dim)
        del saved
        with torch.enable_grad():
            xg = x.detach().requires_grad_()
            y = ctx.original(xg, *ctx.args, **ctx.kwargs)
        if not ctx.hook.active:
            return torch.autograd.grad(y, xg, grad)[0], None, None, None, None, None
        (g,) = torch.autograd.grad(y, xg, grad / ctx.hook._stabilize(y.detach()))
        return x * g, None, None, None, None, None
