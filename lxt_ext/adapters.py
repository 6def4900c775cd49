"""The per-architecture table of lxt_ext's transformer composites: module class -> rule factory.

A factory takes the module and the composite's ``Options`` and returns a zennit Hook (an lxt_ext
rule) for it. Model families register their classes here in modules of their own
(``lxt_ext.huggingface`` for transformers, ``lxt_ext.timm_models`` for timm), imported on first
use so that lxt_ext never imports a model library the user does not use. Lookup walks the
module's MRO, so a subclass inherits its parent's adapter unless it registers its own.
"""
import importlib
from dataclasses import dataclass

from zennit.core import Hook, RemovableHandleList

_TABLE = {}
# Fallbacks of a family for classes the table does not name: matcher(module, options) -> Hook or None.
_MATCHERS = []
# The package a module class comes from -> lxt_ext's module that registers its adapters.
_FAMILIES = {'transformers': 'lxt_ext.huggingface', 'timm': 'lxt_ext.timm_models'}


@dataclass(frozen=True)
class Options:
    """What a composite tells the factories: the attention rule (``'attnlrp'`` or ``'cp'``), the
    stabilizer of the element-wise rules (identity rule on activations), and ``linear``, the
    composite's rule template for Linear layers (Gradient x Input convention), for factories of
    modules that hold linear maps they do not call as ``torch.nn.Linear`` modules (e.g.
    transformers' ``Conv1D``); factories ``.copy()`` it."""
    attention: str = 'attnlrp'
    epsilon: float = 1e-10
    linear: object = None

    def __post_init__(self):
        if self.attention not in ('attnlrp', 'cp'):
            raise ValueError(f"attention must be 'attnlrp' or 'cp', got {self.attention!r}")


def adapter(*classes):
    """Decorator: register ``factory(module, options) -> Hook`` for each class."""
    def register(factory):
        for cls in classes:
            _TABLE[cls] = factory
        return factory
    return register


def matcher(function):
    """Decorator: register ``function(module, options) -> Hook or None``, asked (in registration
    order) about modules whose class the table does not name."""
    _MATCHERS.append(function)
    return function


class KeepGradient(Hook):
    """The rule for modules whose plain gradient already carries relevance correctly in the
    Gradient x Input convention (linear maps of the relevance path, or modules off it, such as
    rotary-embedding tables): registering changes nothing, but the module counts as mapped."""

    def register(self, module):
        return RemovableHandleList([])

    def copy(self):
        return type(self)()


def _load_family(cls):
    family = _FAMILIES.get(cls.__module__.split('.')[0])
    if family is not None:
        importlib.import_module(family)


def rule_for(module, options):
    """The rule the table gives ``module``, or None when no adapter covers its class."""
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
