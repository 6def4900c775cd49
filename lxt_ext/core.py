"""The mechanism under every lxt_ext rule: a module's forward swapped for an autograd Function.

``SwappedForward`` is a zennit ``Hook`` that, while registered, runs the module's forward through
``apply`` (an autograd Function of the rule) instead of hooks: nothing is cloned or kept beyond what
that Function saves, and removal restores the module's own forward. ``ProductRule`` is the rule of a
layer ``y = W x + b``: ``_FusedLayer`` keeps the layer input and calls the rule's ``backward_op``;
``FusedRule`` is a ``ProductRule`` whose ``backward_op`` is the one extension op
``torch.ops.lxt_ext.lrp_backward`` with fixed rule data (a rule code from ``lxt_ext.ops.RULES``, its
parameters and how the bias enters the two denominators; ``csrc/rules/`` holds the math).

``convention`` says what the gradient slot carries: ``'explicit'`` (zennit's: relevance, ``R_in = x *
W^T S``) or ``'gradient_x_input'`` (relevance per unit of the tensor, used inside lxt_ext's transformer
composites: ``R = y * g_out`` in and ``g_in`` out, with ``x * g_in`` the input relevance).

Rules share tensors of one forward pass through ``SHARED`` (``SharedTensors``), never through
attributes written on tensors or module globals of their own.
"""
import collections
import inspect
import threading
import weakref

import torch
from torch.utils.weak import WeakTensorKeyDictionary
from zennit.core import Hook, RemovableHandle, RemovableHandleList, Stabilizer

from . import checks, ops
from .checks import first_order
from .layers import LayerSpec, check_input

CONVENTIONS = ('explicit', 'gradient_x_input')


class SharedTensors:
    """What rules tell each other about the tensors of a forward pass, per thread.

    - ``kept``: the inputs product rules most recently saved for backward (weakly, the last 8). A
      residual ``Sum``'s stacked input repeats the block input, which the block's first layer keeps:
      ``Norm`` on the sum saves a reference to that tensor instead of a copy (``kept_equal``).
    - ``recompute``: ``output -> (x, fn, version)`` for outputs ``fn(x)`` of identity-rule activations,
      whose rule keeps ``x`` anyway. A product rule consuming such an output unmodified since (same
      version) keeps ``x`` and recomputes ``fn(x)`` in backward: one activation-sized tensor less per MLP.

    Both only save memory, so under ``torch.compile`` they are off: dynamo cannot trace the weak
    containers (each rule would break the graph), and the relevance is the same either way.
    """

    def __init__(self, size=8):
        self._size = size
        self._local = threading.local()

    def _state(self):
        state = self._local
        if not hasattr(state, 'kept'):
            state.kept = collections.deque(maxlen=self._size)
            state.recompute = WeakTensorKeyDictionary()
        return state

    def keep(self, tensor):
        if not torch.compiler.is_compiling():
            self._state().kept.append(weakref.ref(tensor))

    def kept_equal(self, tensor):
        """A tensor a product rule keeps anyway that is bitwise equal to ``tensor``, or None."""
        if torch.compiler.is_compiling():
            return None
        for ref in reversed(self._state().kept):
            kept = ref()
            if (kept is not None and kept.shape == tensor.shape and kept.dtype == tensor.dtype
                    and kept.device == tensor.device and torch.equal(kept, tensor)):
                return kept
        return None

    def mark_recomputable(self, output, x, fn):
        if not torch.compiler.is_compiling():
            self._state().recompute[output] = (x, fn, output._version)

    def recomputable(self, tensor):
        """``(x, fn)`` if ``tensor`` is ``fn(x)`` of an identity-rule activation, unmodified since; else None."""
        if torch.compiler.is_compiling():
            return None
        entry = self._state().recompute.get(tensor)
        if entry is None or entry[2] != tensor._version:
            return None
        return entry[:2]


SHARED = SharedTensors()


def call_arguments(function, *args, **kwargs):
    """The arguments of a call of ``function``, by name, with its defaults filled in."""
    bound = inspect.signature(function).bind(*args, **kwargs)
    bound.apply_defaults()
    return bound.arguments


def epsilon_of(value, argument):
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


def zeroes_bias(zero_params):
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


_RULE = '_lxt_ext_rule'  # the module attribute holding its registered SwappedForward


def rule_of(module):
    """The lxt_ext rule (a ``SwappedForward``) registered on ``module``, or None."""
    return module.__dict__.get(_RULE)


class SwappedForward(Hook):
    """A zennit Hook that, while registered, runs the module's forward through an autograd Function
    (``apply``) instead of hooks: nothing is cloned or kept beyond what that Function saves.

    ``checked``: the layer's input and arriving relevance are checked for NaN/Inf (``lxt_ext.checks``).
    ``keeps_output``: backward reads the output this rule returns, so model code must not change it in place
    (autograd's version check would raise)."""
    checked = True
    keeps_output = False

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
        if rule_of(module) is not None:
            raise RuntimeError(
                f'{checks.where(self, module)} already has the lxt_ext rule {type(rule_of(module)).__name__} '
                f'registered (a composite registered twice, or two composites on one model); remove it first')
        for name, parameter in module.named_parameters(recurse=False):
            checks.parameter(parameter, lambda: f'the {name} of {checks.where(self, module)}')
        self._module = module
        module.__dict__[_RULE] = self
        self._previous_forward = module.__dict__.get('forward')
        original = self.plain_forward(module, module.forward)
        hook = self

        def forward(input, *args, **kwargs):
            # zennit registers no backward hook where no gradient is asked for; neither do we. A rule
            # made inactive (zennit's Composite.inactive) before the forward pass leaves it plain.
            # any tensor argument counts: attention pooling's query is a parameter (frozen while attributing)
            if not (hook.active and torch.is_grad_enabled() and isinstance(input, torch.Tensor) and any(
                    isinstance(t, torch.Tensor) and t.requires_grad for t in (input, *args, *kwargs.values()))):
                return original(input, *args, **kwargs)
            output = hook.apply(module, original, input, args, kwargs)
            if hook.checked:
                checks.layer(hook, module, input, output)
            return output

        forward.__wrapped__ = module.forward
        module.forward = forward
        return RemovableHandleList([RemovableHandle(self)])

    def remove(self):
        super().remove()
        module, self._module = self._module, None
        if module is None:
            return
        module.__dict__.pop(_RULE, None)
        if self._previous_forward is not None:
            module.forward = self._previous_forward
        else:
            module.__dict__.pop('forward', None)
        self._previous_forward = None


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
    of ``lxt_ext.ops.RULES``), its parameters, and ``rule_biases``."""
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

# Half-precision dtypes whose element-wise rule math runs in float32.
LOW_PRECISION = (torch.float16, torch.bfloat16)
