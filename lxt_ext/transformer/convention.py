"""The two conventions meeting in lxt_ext's transformer composites, in one place.

Inside these composites the gradient slot carries relevance per unit of the tensor (Gradient x Input:
``R_t = t * g_t``); zennit's rules and lxt_ext's explicit-only rules (ZBox, Flat, Norm) compute explicit
relevance ``R``. ``gradient_x_input(rule)`` gives any rule its Gradient x Input form,
``emitting_relevance(rule)`` the form of the first layer, whose backward emits explicit ``R_in`` so
that zennit's attributors return relevance.

- zennit's own rules (``BasicHook`` subclasses: Epsilon, Gamma, Flat, ZBox, WSquare, ...): zennit's
  backward on ``R_out = y * g_out``, then ``g_in = R_in / stab(x)`` (``ZennitRule``);
- lxt_ext's explicit-only rules the same way around their own backward (``ExplicitConvention``);
- lxt_ext's fused rules by their ``convention`` flag; Pass becomes the identity rule (the same rule:
  ``R_in = R_out``).

``stab`` is ``zennit.core.stabilize`` with the composite's ``input_stabilizer``.
"""
import torch
from zennit.core import BasicHook, Hook
from zennit.rules import Pass as ZennitPass

from .._docstrings import shared_parameters
from ..checks import first_order
from ..core import FusedRule, ProductRule, RuleHook, SwappedForward, wants_relevance
from ..rules import Norm, Pass
from .elementwise import INPUT_STABILIZER, ActivationIdentity

__all__ = ['ZennitRule', 'times_input', 'ExplicitRelevance', 'ExplicitConvention', 'OutputRelevance',
           'relevance_seeded', 'seeded_with_relevance', 'gradient_x_input', 'emitting_relevance', 'linear_rule_apply']


class _ZennitBackward(torch.autograd.Function):
    """The module's forward; in backward, zennit's rule on ``R_out = y * g_out``."""

    @staticmethod
    def forward(ctx, input, rule, module, original, args, kwargs):
        output = original(input, *args, **kwargs)
        ctx.save_for_backward(input, output)
        ctx.rule, ctx.module, ctx.original, ctx.args, ctx.kwargs = rule, module, original, args, kwargs
        return output

    @staticmethod
    @first_order
    def backward(ctx, grad):
        x, output = ctx.saved_tensors
        # linear_rule_apply passes a factory: the module is built only when a backward needs it
        module = ctx.module if isinstance(ctx.module, torch.nn.Module) else ctx.module()
        grad_input = ctx.rule.grad_input(module, ctx.original, x, output, grad, ctx.args, ctx.kwargs)
        return grad_input, None, None, None, None, None


@shared_parameters('explicit_output', 'input_stabilizer')
class ZennitRule(SwappedForward):
    """A zennit rule (a ``BasicHook``: Epsilon, Gamma, ZPlus, AlphaBeta, Flat, WSquare, ZBox, ...)
    in the Gradient x Input convention, for this hook only (zennit is not patched): zennit's own
    backward runs on ``R_out = y * g_out`` and gives ``R_in``; the gradient is ``R_in / stab(x)``,
    or ``R_in`` itself with ``explicit_output`` (the first layer, so attributors return relevance).

    Parameters
    ----------
    rule : zennit.core.BasicHook
        The zennit rule (another type raises ``TypeError``).
    """

    def __init__(self, rule, explicit_output=False, input_stabilizer=INPUT_STABILIZER):
        super().__init__()
        if not isinstance(rule, BasicHook):
            raise TypeError(f'ZennitRule adapts zennit BasicHook rules, not {type(rule).__name__}')
        self.rule = rule
        self.explicit_output = explicit_output
        self.input_stabilizer = input_stabilizer

    def apply(self, module, original, input, args, kwargs):
        return _ZennitBackward.apply(input, self, module, original, args, kwargs)

    def grad_input(self, module, original, x, output, grad, args, kwargs):
        if not self.active:
            with torch.enable_grad():
                leaf = x.detach().requires_grad_()
                return torch.autograd.grad(original(leaf, *args, **kwargs), leaf, grad)[0]
        rule = self.rule
        rule.stored_tensors['input'] = (x, *args)  # what zennit's forward hook would have kept
        rule.stored_tensors['kwargs'] = kwargs     # (zennit 1.0 also keeps the keyword arguments)
        # zennit re-runs module.forward, which is swapped to this rule while registered (and wrapped by
        # OutputRelevance on the model itself): the plain forward instead, for the re-run only
        swapped = module.__dict__.get('forward')
        module.forward = original
        try:
            (relevance, *_) = rule.backward(module, (x,), (grad * output,))
        finally:
            if swapped is None:
                module.__dict__.pop('forward', None)
            else:
                module.forward = swapped
            rule.stored_tensors.clear()
        return relevance if self.explicit_output else over_stabilized(relevance, x, self.input_stabilizer)

    def linear(self, x, weight, bias):
        """``F.linear(x, weight, bias)`` with this rule in backward (a Linear map not called as a module)."""
        def original(input):
            return torch.nn.functional.linear(input, weight, bias)
        return _ZennitBackward.apply(x, self, lambda: _LinearShell(weight, bias), original, (), {})


class _TimesInput(torch.autograd.Function):
    """Identity forward; backward ``g * x``: turns the gradient into explicit relevance."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.view_as(x)

    @staticmethod
    @first_order
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * x


def times_input(x):
    """``x`` unchanged in the forward; in the backward the gradient arriving at it leaves multiplied by ``x``: a
    gradient seed ``df/dx`` becomes the relevance seed ``x * df/dx`` (LXT's reading of ``f(x).backward()``).

    Parameters
    ----------
    x : torch.Tensor
        E.g. the logits.

    Returns
    -------
    torch.Tensor
        ``x``, as a new node of the graph.
    """
    return _TimesInput.apply(x)


class _ConventionWrapper(SwappedForward):
    """A rule that runs another lxt_ext rule (``self.rule``) in a changed convention."""

    def prepare(self, module):
        self.rule.prepare(module)


class ExplicitRelevance(_ConventionWrapper):
    """An lxt_ext rule (fused, or another ``SwappedForward`` Linear rule) on the first layer whose
    backward emits ``R_in = x * g_in``, so that ``zennit.attribution.Gradient`` returns relevance.
    (zennit rules: ``ZennitRule(rule, explicit_output=True)``.)

    Parameters
    ----------
    rule : zennit.core.Hook
        The lxt_ext rule (its Gradient x Input form is used, see ``gradient_x_input``).
    """

    def __init__(self, rule):
        super().__init__()
        self.rule = gradient_x_input(rule)

    def apply(self, module, original, input, args, kwargs):
        return self.rule.apply(module, original, _TimesInput.apply(input), args, kwargs)


class _RelevanceToGradient(torch.autograd.Function):
    """Identity forward; backward ``g = R / stab(x)``: explicit relevance arriving at ``x`` leaves as the
    gradient of the Gradient x Input convention (``x * g = R`` up to the stabilizer)."""

    @staticmethod
    def forward(ctx, x, stabilizer):
        ctx.save_for_backward(x)
        ctx.stabilizer = stabilizer
        return x.view_as(x)

    @staticmethod
    @first_order
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return over_stabilized(grad, x, ctx.stabilizer), None


def over_stabilized(relevance, x, stabilizer):
    """``relevance / stab(x)`` (zennit's ``stabilize``): explicit relevance at ``x`` as the gradient of the
    Gradient x Input convention. The denominator is built in one tensor that then takes the quotient: one
    ``x``-sized temporary, not four (this runs on every explicit rule inside a composite and on the model's output).

    Parameters
    ----------
    relevance : torch.Tensor
        Relevance shaped like ``x``.
    x : torch.Tensor
        The tensor it arrives at.
    stabilizer : float
        The epsilon of ``stab(x) = x + eps * (sign(x) + [x == 0])``.

    Returns
    -------
    torch.Tensor
    """
    denominator = x.sign().add_(x == 0).mul_(stabilizer).add_(x)
    return torch.div(relevance, denominator, out=denominator)


@shared_parameters('explicit_output', 'input_stabilizer')
class ExplicitConvention(_ConventionWrapper):
    """An lxt_ext rule of zennit's explicit convention only (``ZBox``, ``Flat``, ``Norm``) in a
    Gradient x Input composite: it gets ``R_out = y * g_out`` and its ``R_in`` leaves as
    ``R_in / stab(x)``, or as ``R_in`` itself with ``explicit_output`` (the first layer).

    Parameters
    ----------
    rule : zennit.core.Hook
        The explicit-only lxt_ext rule.
    """

    def __init__(self, rule, explicit_output=False, input_stabilizer=INPUT_STABILIZER):
        super().__init__()
        self.rule, self.explicit_output = rule, explicit_output
        self.input_stabilizer = input_stabilizer

    def apply(self, module, original, input, args, kwargs):
        x = input if self.explicit_output else _RelevanceToGradient.apply(input, self.input_stabilizer)
        return _TimesInput.apply(self.rule.apply(module, original, x, args, kwargs))


def gradient_x_input(rule, input_stabilizer=INPUT_STABILIZER):
    """``rule`` (a template) as it runs in a Gradient x Input composite: lxt_ext's fused rules get
    ``convention='gradient_x_input'``, zennit's BasicHook rules are wrapped in ``ZennitRule``,
    zennit's and lxt_ext's Pass become the identity rule (the same rule: ``R_in = R_out``), lxt_ext's
    explicit-only rules (ZBox, Flat, Norm) are wrapped in ``ExplicitConvention``;
    rules written for this convention (lxt_ext's SwappedForward rules, ``lxt_ext.models.KeepGradient``)
    are returned as they are. Other zennit hooks have no Gradient x Input form: TypeError.

    Parameters
    ----------
    rule : zennit.core.Hook
        The rule template.
    input_stabilizer : float, optional
        The epsilon of ``stab(x)`` in the wrappers' divisions by the input, ``R_in / stab(x)``, and in the
        identity rule that replaces Pass (default 1e-10).

    Returns
    -------
    zennit.core.Hook
        The rule in Gradient x Input form: ``rule`` itself, a copy, or a new wrapper.
    """
    if isinstance(rule, FusedRule):
        if rule.convention == 'gradient_x_input':
            return rule
        copy = rule.copy()
        copy.convention = 'gradient_x_input'
        return copy
    if isinstance(rule, (Pass, ZennitPass)):
        return ActivationIdentity(input_stabilizer)
    if isinstance(rule, (ProductRule, Norm)):
        return ExplicitConvention(rule, input_stabilizer=input_stabilizer)
    if isinstance(rule, RuleHook) or not isinstance(rule, Hook) or type(rule).register is not Hook.register:
        return rule
    if isinstance(rule, BasicHook):
        return ZennitRule(rule, input_stabilizer=input_stabilizer)
    raise TypeError(f'{type(rule).__name__} is a zennit hook with no Gradient x Input form; lxt_ext\'s transformer '
                    f'composites take zennit BasicHook rules (Epsilon, Gamma, Flat, ZBox, ...), Pass, and lxt_ext '
                    f'rules')


def emitting_relevance(rule):
    """``rule`` (in Gradient x Input form) on the first layer: its backward emits explicit relevance
    ``R_in`` instead of ``g_in``. Linear rules of this convention (those with a ``linear`` method: the
    fused rules, ``OutputEpsilon``) get ``R_in = x * g_in``; zennit's and the explicit-only rules return
    their own ``R_in``.

    Parameters
    ----------
    rule : zennit.core.Hook
        A rule in Gradient x Input form (as ``gradient_x_input`` returns it); another raises ``TypeError``.

    Returns
    -------
    zennit.core.Hook
        A new rule: ``ZennitRule`` or ``ExplicitConvention`` with ``explicit_output=True``, or
        ``ExplicitRelevance``.
    """
    if isinstance(rule, ZennitRule):
        return ZennitRule(rule.rule, explicit_output=True, input_stabilizer=rule.input_stabilizer)
    if isinstance(rule, ExplicitConvention):
        return ExplicitConvention(rule.rule, explicit_output=True, input_stabilizer=rule.input_stabilizer)
    if hasattr(rule, 'linear') or hasattr(rule, 'convolution'):
        return ExplicitRelevance(rule)
    raise TypeError(f'the first layer needs an lxt_ext or zennit rule for Linear/convolutions, not '
                    f'{type(rule).__name__}')


def linear_rule_apply(rule, x, weight, bias=None):
    """``F.linear(x, weight, bias)`` with ``rule`` (an lxt_ext Linear rule or a zennit rule template,
    run in the Gradient x Input convention; None: the plain gradient) in backward: for linear maps
    that are not called as ``nn.Linear`` modules, where zennit's hooks never fire.

    Parameters
    ----------
    rule : zennit.core.Hook or None
        The rule; one without a Gradient x Input Linear form raises ``TypeError``.
    x : torch.Tensor
        The input.
    weight : torch.Tensor
        The weight, (out, in).
    bias : torch.Tensor, optional
        The bias, (out,).

    Returns
    -------
    torch.Tensor
        ``x W^T + b``.
    """
    if rule is None or not wants_relevance(rule, x):
        return torch.nn.functional.linear(x, weight, bias)
    rule = gradient_x_input(rule)
    if not hasattr(rule, 'linear'):
        raise TypeError(f'linear_rule_apply takes lxt_ext Linear rules and zennit BasicHook rules, not '
                        f'{type(rule).__name__}')
    return rule.linear(x, weight, bias)


class _LinearShell(torch.nn.Linear):
    """A Linear module over given weight and bias (no copies), for zennit rules, which modify and
    re-run a module's parameters and forward."""

    def __init__(self, weight, bias):
        torch.nn.Module.__init__(self)
        self.out_features, self.in_features = weight.shape
        self.weight = torch.nn.Parameter(weight.detach(), requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach(), requires_grad=False)


class OutputRelevance(RuleHook):
    """The model output in zennit's convention: the seed an attributor passes at the output (zennit's
    ``attr_output``) is the output's *relevance* ``R``, as for zennit's own composites, and enters the
    Gradient x Input interior as ``g = R / stab(y)`` (``stab`` with ``stabilizer``).

    So a one-hot seed gives input relevance summing to about 1 and the seed ``y * one_hot`` to the
    explained logit, whatever its sign. Registered on the model (the root module a composite is registered
    on, after the rules, so after any head or softcap a rule computes there), it wraps the model's forward,
    so that ``torch.compile`` traces the conversion with the model, and converts every floating tensor at the
    top level of the output (a tensor, a tuple or list of them, or the fields of transformers'
    ``ModelOutput``).

    Parameters
    ----------
    stabilizer : float
        The epsilon of ``zennit.core.stabilize`` in the division by the output.
    """
    marks = False  # not the model's rule: the model may have one of its own
    checked = False

    def __init__(self, stabilizer=INPUT_STABILIZER):
        super().__init__()
        self.stabilizer = stabilizer

    def attach(self, module):
        inner, hook = module.forward, self

        def forward(*args, **kwargs):
            return hook._convert(inner(*args, **kwargs))

        self.swap_forward(module, forward)

    def _convert(self, output):
        if not (self.active and torch.is_grad_enabled()):
            return output
        if isinstance(output, torch.Tensor):
            return self._seeded(output)
        if isinstance(output, (tuple, list)) and not hasattr(output, 'keys'):
            values = [self._seeded(value) for value in output]
            return type(output)(*values) if hasattr(output, '_fields') else type(output)(values)
        if hasattr(output, 'keys') and hasattr(output, 'to_tuple'):  # transformers' ModelOutput
            for key in list(output.keys()):
                output[key] = self._seeded(output[key])
        return output

    def _seeded(self, value):
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.requires_grad:
            # a fresh output of the model: never converted yet (and no grad_fn check, which torch.compile would
            # not trace)
            return _RelevanceToGradient.apply(value, self.stabilizer)
        return value


def relevance_seeded(output, stabilizer=INPUT_STABILIZER):
    """``output`` whose backward reads the arriving seed as relevance ``R`` (``g = R / stab(output)``), as
    :class:`OutputRelevance` leaves a model's outputs; an output converted already is returned as it is.

    Parameters
    ----------
    output : torch.Tensor
        A floating tensor that requires grad.
    stabilizer : float
        The epsilon of ``zennit.core.stabilize``.

    Returns
    -------
    torch.Tensor
        ``output`` (a view) with that backward.
    """
    if seeded_with_relevance(output):
        return output
    return _RelevanceToGradient.apply(output, stabilizer)


def seeded_with_relevance(tensor):
    """Whether the gradient arriving at ``tensor`` is explicit relevance (it is a model output converted by
    :func:`relevance_seeded` or :class:`OutputRelevance`).

    Parameters
    ----------
    tensor : torch.Tensor
        Any tensor.

    Returns
    -------
    bool
    """
    return isinstance(tensor.grad_fn, _RelevanceToGradient._backward_cls)
