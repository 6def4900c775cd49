"""Checks of what flows through lxt_ext's rules: finite inputs, relevance and weights, named by layer.

A NaN or Inf anywhere in an attribution poisons every relevance value computed after it, so rules
stop at the first layer where one appears and say where it came from: the layer's input (forward),
the relevance arriving at the layer (backward: the output seed, or a later layer), or its weights
(checked when the rule is registered).

On the CPU the per-layer checks run by default (one pass over each tensor, no synchronisation);
``lxt_ext.checks.cpu_checks(False)`` or ``LXT_EXT_CPU_CHECKS=0`` turns them off (measuring cost, say). On
CUDA reading a check's result synchronises the device once per tensor, so there they are opt-in:
``lxt_ext.checks.cuda_checks(True)`` or ``LXT_EXT_CUDA_CHECKS=1``. The attributors' checks of input, seed
and result (``ensure_finite``) and the fused C++ rules' checks of their own results run on every device
either way. Under ``torch.compile`` the per-layer checks are off.

lxt_ext's attributor (``lxt_ext.attribution.Explainer``, behind ``lxt_ext.explain``) runs each attribution through ``located``: the
per-layer checks wait until a NaN or Inf shows up in the seed or the result, and only then does the
attribution run again with them, on every device, so that the error names the layer. While values are finite
they cost nothing there, on CUDA included.
"""
import functools
import os
import threading

import torch
from torch.autograd.function import once_differentiable
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ['NonFiniteError', 'applies', 'cpu_checks', 'cuda_checks', 'ensure_finite', 'finite', 'first_order', 'layer',
           'located', 'parameter', 'where']

_ENABLED = {'cpu': os.environ.get('LXT_EXT_CPU_CHECKS', '1') != '0',
            'cuda': os.environ.get('LXT_EXT_CUDA_CHECKS', '') not in ('', '0')}


# this thread's mode of the per-layer checks inside ``located``: None (as ``_ENABLED`` says), 'deferred' (off) or
# 'locating' (on for every device)
_LOCAL = threading.local()
# how the fused C++ rules' own check of their results begins its message (csrc/rules/terms.cpp, fail_non_finite)
_FUSED_RULE_FAILURE = 'rule produced NaN or Inf'


class NonFiniteError(FloatingPointError, RuntimeError):
    """A tensor of the attribution holds NaN or Inf (a RuntimeError too, as the fused ops' own check)."""


def _switch(device, enabled):
    if enabled is not None:
        _ENABLED[device] = bool(enabled)
    return _ENABLED[device]


def cpu_checks(enabled=None):
    """Whether the per-layer checks run on CPU tensors (default: on); sets it for every thread if ``enabled``
    is given (True or False; None only reads the setting).

    Parameters
    ----------
    enabled : bool, optional
        The new setting.

    Returns
    -------
    bool
        Whether they run, after the change.
    """
    return _switch('cpu', enabled)


def cuda_checks(enabled=None):
    """Whether the per-layer checks run on CUDA tensors, where each costs a device sync (default: off unless
    ``LXT_EXT_CUDA_CHECKS=1``).

    Parameters
    ----------
    enabled : bool, optional
        True switches them on for every thread, False off; None (default) leaves the setting as it is.

    Returns
    -------
    bool
        The setting now.
    """
    return _switch('cuda', enabled)


def applies(tensor):
    """Whether the per-layer checks run on ``tensor`` (floating, on a device whose checks are enabled, not
    compiling).

    Parameters
    ----------
    tensor : object
        What a rule is about to check; anything but a floating tensor is not checked.

    Returns
    -------
    bool
        False while ``located`` defers the checks, True while it locates a failure, else the setting of
        the tensor's device (``cpu_checks``, ``cuda_checks``).
    """
    mode = getattr(_LOCAL, 'mode', None)
    if mode == 'deferred' or not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() \
            or torch.compiler.is_compiling():
        return False
    return mode == 'locating' or _ENABLED.get(tensor.device.type, False)


def located(attempt):
    """``attempt()`` (one attribution, forward and backward) with the per-layer checks deferred: it runs without
    them, and where a NaN or Inf stops it (``NonFiniteError`` from the attributor's checks of seed and result, or
    a fused rule's own check), it runs once more with them on every device, so that the error names the layer
    where the value appeared (that run's error is raised; the first one if it raises none). A NaN that reaches
    neither the seed nor the result goes unreported. Inside another ``located``, ``attempt()`` runs as it is.

    Parameters
    ----------
    attempt : callable
        ``attempt()`` runs one whole attribution (forward and backward); it may run twice.

    Returns
    -------
    object
        What the first ``attempt()`` returned.

    Raises
    ------
    NonFiniteError
        From the second run, naming the layer (or the first run's error if the second raises none).
    """
    if getattr(_LOCAL, 'mode', None) is not None:
        return attempt()
    _LOCAL.mode = 'deferred'
    try:
        return attempt()
    except RuntimeError as error:
        if not (isinstance(error, NonFiniteError) or _FUSED_RULE_FAILURE in str(error)):
            raise
        failure = error.with_traceback(None)  # its frames would keep the failed attribution's tensors alive
    finally:
        _LOCAL.mode = None
    _LOCAL.mode = 'locating'
    try:
        attempt()
    finally:
        _LOCAL.mode = None
    raise failure


def finite(tensor, what):
    """Raise ``NonFiniteError`` naming ``what`` if ``tensor`` holds NaN or Inf, where checks apply (``applies``:
    anything but a floating tensor passes); return the tensor.

    Parameters
    ----------
    tensor : object
        The value to check.
    what : str or callable
        How the error names it (``'the input of ...'``), or a callable giving that text on failure.

    Returns
    -------
    object
        ``tensor`` itself.
    """
    if applies(tensor):
        ensure_finite(tensor, what)
    return tensor


def ensure_finite(tensor, what):
    """``finite`` on every device (the attribution's boundaries: one sync per attribution on CUDA);
    ``what`` may be a callable giving the description.

    Parameters
    ----------
    tensor : torch.Tensor
        The value to check; a tensor of integers or bools passes.
    what : str or callable
        How the error names it, or a callable giving that text on failure.

    Returns
    -------
    torch.Tensor
        ``tensor`` itself.
    """
    if not tensor.is_floating_point():
        return tensor
    # The sum is NaN/Inf when an element is, needs no tensor-sized temporary (torch.isfinite makes three)
    # and is one vectorised pass; an overflowing sum of finite values is told apart by isfinite. Under
    # no_grad, or autograd would keep the tensor for backward.
    with torch.no_grad():
        total = tensor.sum(dtype=torch.float32 if tensor.dtype in (torch.float16, torch.bfloat16) else None)
        if not bool(torch.isfinite(total)) and not bool(torch.isfinite(tensor).all()):
            what = what() if callable(what) else what
            raise NonFiniteError(f'{what} holds {"NaN" if bool(torch.isnan(tensor).any()) else "Inf"}')
    return tensor


# parameter -> (version counter, storage address) when it was last found finite
_FINITE_PARAMETERS = WeakIdKeyDictionary()


def parameter(tensor, what):
    """``finite`` for a module parameter at a rule's registration, read once per content: composites are
    registered anew for every batch, and reading every weight each time would cost as much as the per-layer
    checks of a whole attribution. A parameter is read again after any in-place write (optimiser steps,
    ``load_state_dict``, ``copy_`` under no_grad: each bumps its version counter) or ``.data`` assignment.

    Parameters
    ----------
    tensor : torch.Tensor
        The parameter (a weight or bias).
    what : str or callable
        How the error names it (``'the weight of ...'``), or a callable giving that text on failure.

    Returns
    -------
    torch.Tensor
        ``tensor`` itself.
    """
    if not applies(tensor):
        return tensor
    state = (tensor._version, tensor.data_ptr())
    if _FINITE_PARAMETERS.get(tensor) != state:
        ensure_finite(tensor.detach(), what)
        _FINITE_PARAMETERS[tensor] = state
    return tensor


def where(hook, module):
    """How errors name the layer of ``hook``: its name in the model where the composite recorded it.

    Parameters
    ----------
    hook : zennit.core.Hook
        The rule registered on the module (its ``module_name``, if the composite recorded one, is used).
    module : torch.nn.Module
        The module the rule is registered on.

    Returns
    -------
    str
        ``"'name' (Type)"``, or the type's name alone.
    """
    name = getattr(hook, 'module_name', None)
    kind = type(module).__name__
    return f'{name!r} ({kind})' if name else kind


def layer(hook, module, input, output):
    """The per-layer checks of a rule's forward call: its input now, the relevance arriving at its output
    (the gradient of the first output tensor) in backward, decided now: autograd runs a CUDA backward in a
    thread of its own, where ``located``'s mode is not set. Messages are formed only on failure.

    Parameters
    ----------
    hook : zennit.core.Hook
        The rule whose forward call is checked (names the layer).
    module : torch.nn.Module
        The module it is registered on.
    input : torch.Tensor
        The module's input, checked now.
    output : torch.Tensor or tuple of torch.Tensor
        The module's output: a hook on it (its first tensor) checks the relevance arriving in backward.
    """
    if applies(input):
        ensure_finite(input, lambda: f'the input of {where(hook, module)}')
    tensor = output[0] if isinstance(output, tuple) and output else output
    if applies(tensor) and tensor.requires_grad:
        def check(grad):  # autograd may call it with None (no gradient flows there)
            if grad is not None:
                ensure_finite(grad, lambda: f'the relevance arriving at {where(hook, module)} (from the output seed or '
                                            f'a later layer)')
        tensor.register_hook(check)


def first_order(backward):
    """``torch.autograd.function.once_differentiable`` for the rules' backward, with a clear error for
    ``create_graph=True`` (autograd runs a backward with grad mode on exactly then): LRP relevance is not a
    derivative, so there is no second-order relevance to give, and once_differentiable alone would return
    a result that silently does not depend on anything.

    Parameters
    ----------
    backward : callable
        An autograd Function's ``backward(ctx, *grads)``.

    Returns
    -------
    callable
        The wrapped backward: once differentiable, raising ``RuntimeError`` under ``create_graph=True``.
    """
    once = once_differentiable(backward)

    @functools.wraps(backward)
    def checked(ctx, *grads):
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            raise RuntimeError('lxt_ext rules are once-differentiable: relevance cannot be taken with '
                               'create_graph=True (second-order use); attribute without it')
        return once(ctx, *grads)
    return checked
