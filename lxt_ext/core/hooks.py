"""The one base of every lxt_ext rule, ``RuleHook``, and the rules that are nothing more.

A ``RuleHook`` is a zennit ``Hook``. Registering it on a module marks the module (``rule_of(module)`` is the one
reader of that mark: audit, conservation and the rules themselves ask it), checks the module's own parameters
for NaN/Inf, and calls ``attach``; removing it calls ``detach``, restores a forward it swapped, and unmarks.
``copy()`` gives an unregistered copy with the same settings. ``wants_relevance(*tensors)`` is the one gate of
whether a rule acts: the hook is active (zennit's ``Composite.inactive`` switches it off), gradients are
enabled, and a tensor that takes part requires grad.

- ``SwappedForward``: the module's forward runs through ``apply`` (an autograd Function of the rule) instead of
  hooks; nothing is cloned or kept beyond what that Function saves.
- ``KeepGradient``: the module's plain gradient already carries relevance (Gradient x Input convention):
  registering changes nothing but the mark. ``Refused``: a module no rule covers, refused by name.
- ``ConfigViewRule`` (``lxt_ext.core.config_view``): the module's config replaced by a view.
"""
import inspect

import torch
from zennit.core import Hook, RemovableHandle, RemovableHandleList

from .. import checks
from .._docstrings import shared_parameters
from ..errors import NotExplainableError

__all__ = ['RuleHook', 'SwappedForward', 'KeepGradient', 'Refused', 'rule_of', 'wants_relevance', 'call_arguments']

_RULE = '_lxt_ext_rule'  # the module attribute holding its registered rule


@shared_parameters('any_module')
def rule_of(module):
    """The lxt_ext rule registered on ``module``, or None.

    Returns
    -------
    RuleHook or None
    """
    return module.__dict__.get(_RULE)


def wants_relevance(hook, *tensors):
    """Whether ``hook`` acts on a call with ``tensors``: it is active, gradients are enabled and a tensor among
    them requires grad (else the plain forward runs: zennit registers no backward hook there either).

    Parameters
    ----------
    hook : zennit.core.Hook
        The rule (any zennit hook: its ``active`` flag is read).
    *tensors : object
        The call's arguments; those that are not tensors are ignored.

    Returns
    -------
    bool
    """
    return hook.active and torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def call_arguments(function, *args, **kwargs):
    """The arguments of a call of ``function``, by name, with its defaults filled in.

    Parameters
    ----------
    function : callable
        The function called (its signature binds the arguments).
    *args : object
        The call's positional arguments.
    **kwargs : object
        The call's keyword arguments.

    Returns
    -------
    dict
        Parameter name -> value, in the signature's order (``inspect.BoundArguments.arguments``).
    """
    bound = inspect.signature(function).bind(*args, **kwargs)
    bound.apply_defaults()
    return bound.arguments


class RuleHook(Hook):
    """The base of every lxt_ext rule (see the module doc).

    Class attributes a rule may set: ``checked`` (the layer's input and arriving relevance are checked for
    NaN/Inf, ``lxt_ext.checks``), ``keeps_output`` (backward reads the output the rule returns, so model code
    must not change it in place), ``covers_children`` (the rule computes the module's children functionally: a
    composite maps none of them), ``marks`` (False for hooks that are not a module's rule, such as the output
    convention on the model itself, which may have a rule of its own), ``covers_operations`` (the rule computes
    the module's operations, or vouches for them, so ``lxt_ext.operations`` leaves them alone; False for rules
    that only reconfigure or wrap the module).
    """
    checked = True
    covers_operations = True
    keeps_output = False
    covers_children = False
    marks = True

    def __init__(self):
        super().__init__()
        self._module = None
        self._swapped = None

    def prepare(self, module):
        """Raise for modules this rule cannot take; keep what the rule needs to know of them.

        Parameters
        ----------
        module : torch.nn.Module
            The module the rule is being registered on.
        """

    def attach(self, module):
        """What registering does beyond marking (swap the forward, give the config a view, ...).

        Parameters
        ----------
        module : torch.nn.Module
            The module, already marked.
        """

    def detach(self, module):
        """Undo ``attach`` (a forward swapped with ``swap_forward`` is restored after this).

        Parameters
        ----------
        module : torch.nn.Module
            The module, still marked.
        """

    def wants_relevance(self, *tensors):
        """Whether this rule acts on a call with ``tensors`` (see :func:`wants_relevance`).

        Parameters
        ----------
        *tensors : object
            The call's arguments.

        Returns
        -------
        bool
        """
        return wants_relevance(self, *tensors)

    def copy(self):
        """An unregistered copy with the same settings; rule templates it holds (zennit hooks, such as a
        composite's Linear rule) are copied too.

        Returns
        -------
        RuleHook
        """
        copy = type(self).__new__(type(self))
        copy.__dict__.update({name: value.copy() if isinstance(value, Hook) else value
                              for name, value in self.__dict__.items()})
        Hook.__init__(copy)
        copy._module = None
        copy._swapped = None
        return copy

    def register(self, module):
        """Register on ``module`` (zennit's hook protocol).

        Parameters
        ----------
        module : torch.nn.Module
            The module the rule is for.

        Returns
        -------
        zennit.core.RemovableHandleList
            The handle that removes the rule.
        """
        self.prepare(module)
        if self._module is not None:
            raise RuntimeError(f'this {type(self).__name__} is already registered to {self._module}; use .copy()')
        if self.marks:
            if rule_of(module) is not None:
                raise RuntimeError(
                    f'{checks.where(self, module)} already has the lxt_ext rule {type(rule_of(module)).__name__} '
                    f'registered (a composite registered twice, or two composites on one model); remove it first')
            for name, parameter in module.named_parameters(recurse=False):
                checks.parameter(parameter, lambda: f'the {name} of {checks.where(self, module)}')
            module.__dict__[_RULE] = self
        self._module = module
        try:
            self.attach(module)
        except BaseException:
            self._unmark(module)
            raise
        return RemovableHandleList([RemovableHandle(self)])

    def remove(self):
        """Undo the registration (zennit's hook protocol); removing twice does nothing."""
        super().remove()
        module = self._module
        if module is None:
            return
        self.detach(module)
        self._unmark(module)

    def _unmark(self, module):
        if self._swapped is not None:
            previous, self._swapped = self._swapped, None
            if previous is _CLASS_FORWARD:
                module.__dict__.pop('forward', None)
            else:
                module.forward = previous
        if self.marks and module.__dict__.get(_RULE) is self:
            del module.__dict__[_RULE]
        self._module = None

    def swap_forward(self, module, forward):
        """Run ``module`` through ``forward`` until removal, which restores what ``module.forward`` was.

        Parameters
        ----------
        module : torch.nn.Module
            The registered module.
        forward : callable
            The new forward; its ``__wrapped__`` is set to the forward it replaces.
        """
        self._swapped = module.__dict__.get('forward', _CLASS_FORWARD)
        forward.__wrapped__ = module.forward
        module.forward = forward


_CLASS_FORWARD = object()  # marks a module whose forward was its class's when a rule swapped it


class SwappedForward(RuleHook):
    """A rule that runs the module's forward through ``apply`` (an autograd Function of the rule) while the
    gate (:meth:`RuleHook.wants_relevance`) is open, else the plain forward."""

    def apply(self, module, original, input, args, kwargs):
        """The module's output, computed with the rule's backward.

        Parameters
        ----------
        module : torch.nn.Module
            The module.
        original : callable
            Its plain forward (``plain_forward``).
        input : torch.Tensor
            The first argument.
        args, kwargs : tuple, dict
            The other arguments.

        Returns
        -------
        object
            What the module returns.
        """
        raise NotImplementedError

    def plain_forward(self, module, original):
        """The forward this rule runs the module with (``original``, its forward at registration).

        Parameters
        ----------
        module : torch.nn.Module
            The module.
        original : callable
            Its forward at registration.

        Returns
        -------
        callable
        """
        return original

    def attach(self, module):
        original = self.plain_forward(module, module.forward)
        hook = self

        def forward(input, *args, **kwargs):
            # any tensor argument counts: attention pooling's query is a parameter (frozen while attributing)
            if not (isinstance(input, torch.Tensor) and hook.wants_relevance(input, *args, *kwargs.values())):
                return original(input, *args, **kwargs)
            output = hook.apply(module, original, input, args, kwargs)
            if hook.checked:
                checks.layer(hook, module, input, output)
            return output

        self.swap_forward(module, forward)


class KeepGradient(RuleHook):
    """The rule for modules whose plain gradient already carries relevance correctly in the Gradient x Input
    convention (linear maps of the relevance path, or modules off it, such as rotary-embedding tables):
    registering changes nothing, but the module counts as mapped (and its parameters as held)."""

    def linear(self, x, weight, bias):
        """``F.linear(x, weight, bias)`` with its plain gradient: as a composite's Linear rule, LRP-epsilon
        with epsilon -> 0, which in this convention is the gradient (``y / stab(y) = 1``).

        Parameters
        ----------
        x, weight, bias : torch.Tensor
            As ``torch.nn.functional.linear`` takes them (``bias`` may be None).

        Returns
        -------
        torch.Tensor
        """
        return torch.nn.functional.linear(x, weight, bias)


class Refused(KeepGradient):
    """Refuses a module no rule here covers, by name and ``reason``, when a composite registers.

    Parameters
    ----------
    reason : str
        Why the module is refused (completes "<module class>: ...").
    error : type
        The exception raised.
    """

    def __init__(self, reason, error=NotExplainableError):
        super().__init__()
        self.reason, self.error = reason, error

    def prepare(self, module):
        raise self.error(f'{type(module).__module__}.{type(module).__qualname__}: {self.reason}; leave this model out '
                         f'of the composite or map the module with layer_map=[(type, rule)]')
