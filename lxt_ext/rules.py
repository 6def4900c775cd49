"""zennit rules whose backward is one fused lxt_ext op.

``Epsilon``, ``Gamma``, ``ZPlus`` and ``AlphaBeta`` take zennit's arguments and give zennit's
relevance; they differ in how: registering swaps the module's ``forward`` for an autograd Function
that keeps only the layer input and, in backward, calls ``torch.ops.lxt_ext.lrp_backward`` (the
layer products through ATen, the rule's element-wise work in lxt_ext's kernels). zennit's
``BasicHook`` instead re-runs the layer once per modifier and back-propagates through every copy.

Each rule is data for that one mechanism: a rule code, its parameters and how the bias enters the
rule's two denominators (see ``csrc/lrp_math.h`` for the math). ``ZBox``, ``Flat`` (first layers),
``Norm`` (sums, average pooling) and ``Pass`` use the same swapped forward with a few PyTorch products
in backward instead of the op; like the fused rules they keep at most the input. ``convention`` says what the
gradient slot carries: ``'explicit'`` (zennit's: relevance, ``R_in = x * W^T S``) or
``'gradient_x_input'`` (relevance per unit of the tensor, used inside lxt_ext's transformer
composites: ``R = y * g_out`` in and ``g_in`` out, with ``x * g_in`` the input relevance).
"""
import collections
import weakref

import torch
from torch.autograd.function import once_differentiable
from zennit.core import Hook, RemovableHandle, RemovableHandleList, Stabilizer, expand
from zennit.layer import Sum

from . import ops as _ops
from .layers import LayerSpec, check_input

CONVENTIONS = ('explicit', 'gradient_x_input')
# The inputs most recently kept by product rules (weakly). A residual sum's input stacks the block input,
# which the block's first layer already keeps: Norm on the sum keeps a reference to it instead of a copy.
_RECENTLY_KEPT = collections.deque(maxlen=8)
_GRADIENT, _EPSILON, _GAMMA, _ALPHA_BETA = 0, 1, 2, 3


def _epsilon_of(value, argument):
    """The epsilon of a zennit stabilizer argument (a number or a plain ``zennit.core.Stabilizer``)."""
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


def _zeroes_bias(zero_params):
    """zennit's ``zero_params`` for a product layer: only the bias can be zeroed meaningfully."""
    if zero_params is None:
        return False
    names = [zero_params] if isinstance(zero_params, str) else list(zero_params)
    unknown = sorted(set(names) - {'bias'})
    if unknown:
        raise NotImplementedError(
            f'lxt_ext rules can zero the bias only, not {unknown}; use zennit\'s rule for that layer'
        )
    return 'bias' in names


class SwappedForward(Hook):
    """A zennit Hook that, while registered, runs the module's forward through an autograd Function
    (``apply``) instead of hooks: nothing is cloned or kept beyond what that Function saves."""

    def __init__(self):
        super().__init__()
        self._module = None
        self._previous_forward = None

    def prepare(self, module):
        """Raise for modules this rule cannot take; keep what the rule needs to know of them."""

    def apply(self, module, original, input, args, kwargs):
        raise NotImplementedError

    def plain_forward(self, module, original):
        """The forward this rule runs the module with (``original``, its forward at registration)."""
        return original

    def copy(self):
        copy = type(self).__new__(type(self))
        copy.__dict__.update(self.__dict__)
        Hook.__init__(copy)
        copy._module = None
        copy._previous_forward = None
        return copy

    def register(self, module):
        self.prepare(module)
        if self._module is not None:
            raise RuntimeError(f'this {type(self).__name__} is already registered to {self._module}; use .copy()')
        self._module = module
        self._previous_forward = module.__dict__.get('forward')
        original = self.plain_forward(module, module.forward)
        hook = self

        def forward(input, *args, **kwargs):
            # zennit registers no backward hook where no gradient is asked for; neither do we. A rule
            # made inactive (zennit's Composite.inactive) before the forward pass leaves it plain.
            if not (hook.active and torch.is_grad_enabled() and isinstance(input, torch.Tensor)
                    and input.requires_grad):
                return original(input, *args, **kwargs)
            return hook.apply(module, original, input, args, kwargs)

        forward.__wrapped__ = module.forward
        module.forward = forward
        return RemovableHandleList([RemovableHandle(self)])

    def remove(self):
        super().remove()
        module, self._module = self._module, None
        if module is None:
            return
        if self._previous_forward is not None:
            module.forward = self._previous_forward
        else:
            module.__dict__.pop('forward', None)
        self._previous_forward = None


class Pass(SwappedForward):
    """zennit's Pass rule (relevance goes through an element-wise module unchanged), without the
    input clone and backward hooks zennit's version costs on every activation and BatchNorm.

    It keeps nothing for backward, so, unlike the fused rules, it cannot turn back into the plain
    gradient when made inactive only between the forward and the backward pass; inactive during
    the forward pass (``with composite.inactive(): ...`` around both) is plain as in zennit."""

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
    """A zennit Hook whose backward is ``torch.ops.lxt_ext.lrp_backward`` with fixed rule data."""
    code = None

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
        self._epsilon = _epsilon_of(epsilon, 'the stabilizer')
        self._zero_bias = _zeroes_bias(zero_params)

    def rule_biases(self, bias):
        """``(b1, b2)``: the bias as it enters the rule's first and second denominator."""
        raise NotImplementedError

    def backward_op(self, x, weight, bias, grad, spec, output_padding):
        code = self.code if self.active else _GRADIENT
        channels = grad.shape[-1] if spec.linear else grad.shape[1]
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        if bias is None:
            bias = torch.zeros(channels, dtype=acc, device=x.device)
        else:
            bias = bias.detach().to(acc)
        b1, b2 = (torch.zeros_like(bias),) * 2 if self._zero_bias else self.rule_biases(bias)
        return _ops.lib.lrp_backward(
            x, weight.detach(), grad, bias, b1, b2, code, self._epsilon, self.gamma, self.alpha, self.beta,
            self.convention == 'explicit', spec.linear, spec.transposed, list(spec.stride), list(spec.padding),
            list(spec.dilation), output_padding, spec.groups,
        )


class _FusedLayer(torch.autograd.Function):
    """The layer's own forward; the rule's backward. Saves the input, weight and bias only (and, for a
    folded BatchNorm, forms the weight again in backward)."""

    @staticmethod
    def forward(ctx, input, weight, bias, hook, spec, fold, original, args, kwargs):
        output = original(input, *args, **kwargs)
        # An input that is fn(x) of an identity-rule activation, unmodified since, is recomputed in
        # backward from x, which that rule keeps anyway (transformer_rules.identity_rule).
        source, ctx.recompute = input, None
        tag = getattr(input, '_lxt_ext_recompute', None)
        if tag is not None and tag[2] == input._version:
            source, ctx.recompute = tag[0], tag[1]
        else:
            _RECENTLY_KEPT.append(weakref.ref(input))
        ctx.save_for_backward(source, weight, bias)
        ctx.hook, ctx.spec, ctx.fold = hook, spec, fold
        ctx.output_padding = spec.output_padding(weight, input.shape, output.shape)
        return output

    @staticmethod
    @once_differentiable
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


class Epsilon(FusedRule):
    """LRP-epsilon: ``R_in = x * W^T (R / stab(W x + b))``, as ``zennit.rules.Epsilon``."""
    code = _EPSILON

    def __init__(self, epsilon=1e-6, zero_params=None, *, convention='explicit'):
        super().__init__(epsilon=epsilon, zero_params=zero_params, convention=convention)

    def rule_biases(self, bias):
        return bias, torch.zeros_like(bias)


class Gamma(FusedRule):
    """Generalized LRP-gamma, as ``zennit.rules.Gamma``: weights ``W + gamma W+`` for positive and
    ``W + gamma W-`` for negative contributions, biases ``b + gamma b+`` and ``b + gamma b-``."""
    code = _GAMMA

    def __init__(self, gamma=0.25, stabilizer=1e-6, zero_params=None, *, convention='explicit'):
        super().__init__(epsilon=stabilizer, gamma=gamma, zero_params=zero_params, convention=convention)
        self.stabilizer = stabilizer

    def rule_biases(self, bias):
        return bias + self.gamma * bias.clamp(min=0), bias + self.gamma * bias.clamp(max=0)


class AlphaBeta(FusedRule):
    """LRP-alpha-beta, as ``zennit.rules.AlphaBeta``: ``alpha`` times the positive minus ``beta``
    times the negative contributions, each normalized by its own sum (biases ``b+`` and ``b-``)."""
    code = _ALPHA_BETA

    def __init__(self, alpha=2., beta=1., stabilizer=1e-6, zero_params=None, *, convention='explicit'):
        if alpha < 0 or beta < 0:
            raise ValueError("Both alpha and beta parameters must be positive!")
        if (alpha - beta) != 1.:
            raise ValueError("The difference of parameters alpha - beta must equal 1!")
        super().__init__(epsilon=stabilizer, alpha=alpha, beta=beta, zero_params=zero_params, convention=convention)
        self.stabilizer = stabilizer

    def rule_biases(self, bias):
        return bias.clamp(min=0), bias.clamp(max=0)


class ZPlus(AlphaBeta):
    """LRP-z+, as ``zennit.rules.ZPlus``: alpha-beta with ``alpha=1, beta=0``."""

    def __init__(self, stabilizer=1e-6, zero_params=None, *, convention='explicit'):
        super().__init__(alpha=1., beta=0., stabilizer=stabilizer, zero_params=zero_params, convention=convention)


class ZBox(ProductRule):
    """LRP-ZBox, as ``zennit.rules.ZBox``: ``R_in = x W^T s - low W+^T s - high W-^T s`` with
    ``s = R / stab(W x - W+ low - W- high)``. zennit's three biases ``b - b+ - b-`` cancel, so the bias
    (zeroed or not) does not enter. Backward takes three forward and two input-gradient products
    (``W^T s = W+^T s + W-^T s``) from the kept input alone."""

    def __init__(self, low, high, stabilizer=1e-6, zero_params=None):
        super().__init__()
        self.low, self.high = low, high
        self.stabilizer = stabilizer
        self.zero_params = zero_params
        self._stabilize = Stabilizer.ensure(stabilizer)
        _zeroes_bias(zero_params)

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


class Flat(ProductRule):
    """LRP-Flat, as ``zennit.rules.Flat``: the layer with all weights one, inputs one and no bias,
    ``R_in = 1^T (R / stab(1 1))`` (two products from the input's shape alone)."""

    def __init__(self, stabilizer=1e-6, zero_params=None):
        super().__init__()
        self.stabilizer = stabilizer
        self.zero_params = zero_params
        self._stabilize = Stabilizer.ensure(stabilizer)
        _zeroes_bias(zero_params)

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
    keeps a clone of the input and the output relevance until the hook is removed.)"""

    def __init__(self, stabilizer=1e-6):
        super().__init__()
        self.stabilizer = stabilizer
        self._stabilize = Stabilizer.ensure(stabilizer)

    def apply(self, module, original, input, args, kwargs):
        sum_dim = module.dim if isinstance(module, Sum) else None
        return _NormLayer.apply(input, self, original, args, kwargs, sum_dim)


def _kept_equal(tensor):
    """A tensor a product rule keeps anyway that is bitwise equal to ``tensor``, or None."""
    for ref in reversed(_RECENTLY_KEPT):
        kept = ref()
        if (kept is not None and kept.shape == tensor.shape and kept.dtype == tensor.dtype
                and kept.device == tensor.device and torch.equal(kept, tensor)):
            return kept
    return None


class _NormLayer(torch.autograd.Function):
    """The module's own forward; Norm's backward. Saves the input, or a ``Sum``'s input as its slices
    along the summed dimension: a slice equal to a tensor kept by a product rule shares that tensor."""

    @staticmethod
    def forward(ctx, input, hook, original, args, kwargs, sum_dim):
        ctx.hook, ctx.original, ctx.args, ctx.kwargs = hook, original, args, kwargs
        ctx.sum_dim = None
        if sum_dim is not None:
            slices = input.unbind(sum_dim)
            shared = [_kept_equal(part) for part in slices]
            if any(part is not None for part in shared):
                ctx.sum_dim = sum_dim
                ctx.save_for_backward(*(kept if kept is not None else part.contiguous()
                                        for kept, part in zip(shared, slices)))
        if ctx.sum_dim is None:
            ctx.save_for_backward(input)
        return original(input, *args, **kwargs)

    @staticmethod
    @once_differentiable
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
