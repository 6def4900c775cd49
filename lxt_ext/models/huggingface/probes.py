"""Numeric probes for transformers classes no table names: a module is given a rule only if its own output on
a random probe equals the rule's formula (LLaMA's or Gemma's RMSNorm, a LayerNorm, a gated MLP), so a module of
another form is reported as unmapped, never given a wrong rule.
"""
import inspect
import sys

import torch

from .experts import ALL_EXPERTS_FUNCTIONS

__all__ = ['dispatches_attention', 'dispatches_experts', 'rms_norm_offset', 'layer_norm_eps', 'computes_gated_mlp']


def dispatches_attention(module):
    """Whether the module's forward goes through transformers' attention-function registry.

    Parameters
    ----------
    module : torch.nn.Module
        A module of a transformers model.

    Returns
    -------
    bool
        True where its forward calls ``attention_interface`` from the registry.
    """
    modeling = sys.modules.get(type(module).__module__)
    # the forward without its decorators (transformers wraps many in deprecate_kwarg)
    forward = inspect.unwrap(type(module).forward)
    return (hasattr(module, 'config') and getattr(modeling, 'ALL_ATTENTION_FUNCTIONS', None) is not None
            and type(module).__name__.endswith('Attention') and 'attention_interface' in forward.__code__.co_varnames)


def _probe(module, features, dtype=None):
    """A small random input for ``module`` (``features`` wide) on its parameters' device, in ``dtype``
    (default: its parameters' dtype)."""
    parameter = next(module.parameters(), None)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, features, generator=generator)
    return x if parameter is None else x.to(parameter.device, dtype or parameter.dtype)


def _tolerance(x):
    """allclose's (rtol, atol) for two computations of the same function in ``x``'s dtype."""
    return (1e-5, 1e-6) if x.dtype in (torch.float32, torch.float64) else (2e-2, 2e-2)


def _class_forward(module, x):
    """The module's class forward on ``x``, without its hooks or an instance-level forward."""
    return type(module).forward(module, x)


def rms_norm_offset(module):
    """For an RMSNorm class no table names: the ``weight_offset`` (0: ``w * x * rstd``, LLaMA's; 1:
    ``(1 + w) * x * rstd``, Gemma's) whose formula gives the module's own output on a random probe, or
    None (then the module is left unmapped and reported). Checked numerically, so a norm of another
    form is never given the identity rule of a wrong one.

    Parameters
    ----------
    module : torch.nn.Module
        A module named ``*RMSNorm`` (run on the probe through its class forward).

    Returns
    -------
    float or None
        0 (LLaMA's form), 1 (Gemma's), or None where neither gives its output.
    """
    weight = getattr(module, 'weight', None)
    eps = next((getattr(module, n) for n in ('variance_epsilon', 'eps') if isinstance(getattr(module, n, None), float)),
               None)
    # a weight that is no parameter may be a stand-in the forward never reads (Falcon-Mamba's weightless norms of
    # other widths): no match, the operation rules take the norm written out
    if not isinstance(weight, torch.nn.Parameter) or weight.dim() != 1 or eps is None:
        return None
    try:
        with torch.no_grad():
            x = _probe(module, weight.shape[0], torch.float32)
            output = _class_forward(module, x)
            normalised = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
            for offset in (0., 1.):
                if torch.allclose(output.float(), normalised * (offset + weight.float()), rtol=1e-4, atol=1e-5):
                    return offset
    except Exception:  # noqa: BLE001 (a module that cannot run on the probe is no match)
        return None
    return None


def layer_norm_eps(module):
    """For a LayerNorm class no table names (Cohere's, OLMo's, ...): the epsilon with which
    ``F.layer_norm`` over the last dimension, with the module's ``weight`` and ``bias`` (either may be
    absent), gives its output on a random probe, or None (checked numerically, see ``rms_norm_offset``).

    Parameters
    ----------
    module : torch.nn.Module
        A module named ``*LayerNorm`` that is no ``torch.nn.LayerNorm``.

    Returns
    -------
    float or None
        The epsilon that reproduces its output, or None.
    """
    weight, bias = getattr(module, 'weight', None), getattr(module, 'bias', None)
    shape = tuple(getattr(module, 'normalized_shape', ())) or (tuple(weight.shape) if weight is not None else ())
    if len(shape) != 1 or any(t is not None and not isinstance(t, torch.Tensor) for t in (weight, bias)):
        return None
    own = [getattr(module, name) for name in ('eps', 'variance_epsilon')
           if isinstance(getattr(module, name, None), float)]
    try:
        with torch.no_grad():
            x = _probe(module, shape[0], torch.float32)
            output = _class_forward(module, x).float()
            for eps in own + [1e-5, 1e-6, 1e-12]:
                expected = torch.nn.functional.layer_norm(x.float(), shape, None if weight is None else weight.float(),
                                                          None if bias is None else bias.float(), eps)
                if torch.allclose(output, expected, rtol=1e-4, atol=1e-5):
                    return eps
    except Exception:  # noqa: BLE001
        return None
    return None


def computes_gated_mlp(module, rule):
    """For an MLP class no table names: whether it has the attributes a gated-MLP rule names and computes
    ``down(gate * up)`` of the factors that rule takes (checked numerically on a random probe): LLaMA's
    ``gate_proj``/``up_proj``/``down_proj``/``act_fn`` (``GatedMLP``), or Phi-3's fused
    ``gate_up_proj``/``down_proj``/``activation_fn`` (``FusedGatedMLP``).

    Parameters
    ----------
    module : torch.nn.Module
        The module.
    rule : type
        ``GatedMLP`` or ``FusedGatedMLP`` (its ``NAMES`` and ``factors``).

    Returns
    -------
    bool
    """
    if not all(isinstance(getattr(module, name, None), torch.nn.Module) for name in rule.NAMES):
        return False
    first = getattr(module, rule.NAMES[0])
    if not isinstance(first, torch.nn.Linear):
        return False
    try:
        with torch.no_grad():
            x = _probe(module, first.in_features)
            gate, up, down = rule().factors(module, x)
            rtol, atol = _tolerance(x)
            return torch.allclose(_class_forward(module, x), down(gate * up), rtol=rtol, atol=atol)
    except Exception:  # noqa: BLE001 (a module that cannot run on the probe is no match)
        return False


def dispatches_experts(module):
    """Whether the module is a transformers 5 experts module (``@use_experts_implementation``).

    Parameters
    ----------
    module : torch.nn.Module
        Any module of a transformers model.

    Returns
    -------
    bool
        True for an experts module of transformers 5.
    """
    return (ALL_EXPERTS_FUNCTIONS is not None and hasattr(module, 'config') and hasattr(module, 'has_gate')
            and hasattr(module, 'is_concatenated') and hasattr(type(module).forward, '__wrapped__'))

