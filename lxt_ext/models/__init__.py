"""Model support of lxt_ext's transformer composites: one registry, one small table per library.

A factory takes the module and the composite's ``Options`` and returns a zennit Hook (an lxt_ext
rule) for it. Each library registers its classes in a module of its own: ``torch_nn`` (torch.nn's
built-in layers, ``MultiheadAttention`` included; always loaded), ``huggingface`` (transformers),
``timm``, ``bitsandbytes`` (its quantized Linear layers; ``quantized`` holds their rule); a
library's table is imported the first time one of its modules is looked up, so lxt_ext never imports
a model library the user does not use. Lookup walks the module's MRO, so a subclass inherits its
parent's adapter unless it registers its own; classes no table names are then offered to the matchers
(in registration order).
"""
import importlib
from dataclasses import dataclass

from .._docstrings import shared_parameters
from ..core import KeepGradient, Refused  # the rules of table entries that need no rule of their own
from ..ops import attention_mode
from ..transformer.elementwise import INPUT_STABILIZER

__all__ = ['Options', 'KeepGradient', 'Refused', 'adapter', 'matcher', 'rule_for']

_TABLE = {}
# Fallbacks for classes the table does not name: matcher(module, options) -> Hook or None.
_MATCHERS = []
# The package a module class comes from -> lxt_ext's module that registers its adapters.
_FAMILIES = {'transformers': 'lxt_ext.models.huggingface', 'timm': 'lxt_ext.models.timm',
             'bitsandbytes': 'lxt_ext.models.bitsandbytes'}


@dataclass(frozen=True)
@shared_parameters('attention', 'input_stabilizer', leading=True)
class Options:
    """What a composite tells the factories: the attention rule (a name of ``lxt_ext.ops.ATTENTION_MODES``:
    ``'attnlrp'`` or ``'cp'``), the ``input_stabilizer`` of the element-wise rules (the identity rule's
    division by the input), and the composite's rule templates (Gradient x Input convention) for
    Linear layers (``linear``) and convolutions (``conv``), also for modules that hold linear maps
    they do not call as ``torch.nn.Linear`` modules (transformers' ``Conv1D``, the projections of
    ``nn.MultiheadAttention``); factories ``.copy()`` them.

    Parameters
    ----------
    linear, conv : zennit.core.Hook, optional
        The rule templates for Linear layers and convolutions (default None).
    """
    attention: str = 'attnlrp'
    input_stabilizer: float = INPUT_STABILIZER
    linear: object = None
    conv: object = None

    def __post_init__(self):
        attention_mode(self.attention)


def adapter(*classes):
    """Decorator: register ``factory(module, options) -> Hook`` for each class.

    Parameters
    ----------
    *classes : type
        The module classes (their subclasses inherit the entry unless registered themselves).

    Returns
    -------
    callable
        The decorator; it returns the factory unchanged.
    """
    def register(factory):
        for cls in classes:
            _TABLE[cls] = factory
        return factory
    return register


def matcher(function):
    """Decorator: register ``function(module, options) -> Hook or None``, asked (in registration
    order) about modules whose class the table does not name.

    Parameters
    ----------
    function : callable
        ``function(module, options) -> Hook or None``.

    Returns
    -------
    callable
        ``function`` itself.
    """
    _MATCHERS.append(function)
    return function


def _load_family(cls):
    family = _FAMILIES.get(cls.__module__.split('.')[0])
    if family is not None:
        importlib.import_module(family)


def rule_for(module, options):
    """The rule the tables give ``module``, or None when none covers it.

    Parameters
    ----------
    module : torch.nn.Module
        The module (its class's MRO is looked up, then the matchers are asked).
    options : Options
        The composite's options, passed to the factory.

    Returns
    -------
    zennit.core.Hook or None
    """
    for cls in type(module).__mro__:
        _load_family(cls)
        factory = _TABLE.get(cls)
        if factory is not None:
            return factory(module, options)
    for function in _MATCHERS:
        rule = function(module, options)
        if rule is not None:
            return rule
    return None


from . import torch_nn  # noqa: E402,F401  (torch.nn's table is always there)
