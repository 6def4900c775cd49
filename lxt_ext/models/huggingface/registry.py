"""How lxt_ext's rules reach transformers modules without patching them: a module's config is replaced, while
a rule is registered, by a view (``ConfigView``) whose ``_attn_implementation`` (or
``_experts_implementation``, or a softcap) names lxt_ext's entry of transformers' function registries.
Removing the rule gives the module its own config object back.
"""
import torch
from zennit.core import Hook, RemovableHandle, RemovableHandleList

from ...ops import ATTENTION_MODES

__all__ = ['ConfigView', 'ConfigViewRule', 'IMPLEMENTATIONS', 'wants_relevance']

# The entries lxt_ext adds to transformers' attention- and experts-function registries, by attention mode.
IMPLEMENTATIONS = {mode: f'lxt_ext_{mode}' for mode in ATTENTION_MODES}


class ConfigView:
    """A module's config with some attributes replaced (lxt_ext's attention or experts implementation,
    a softcap taken over by a rule); everything else reads and writes through."""

    def __init__(self, config, hook, **overrides):
        object.__setattr__(self, '_lxt_ext_config', config)
        object.__setattr__(self, '_lxt_ext_hook', hook)
        for name, value in overrides.items():
            object.__setattr__(self, name, value)

    def __getattr__(self, name):
        return getattr(self._lxt_ext_config, name)

    def __setattr__(self, name, value):
        setattr(self._lxt_ext_config, name, value)


class ConfigViewRule(Hook):
    """A rule that gives its module a ``ConfigView`` of its config while registered (``overrides``)."""

    def __init__(self):
        super().__init__()
        self._module = None

    def copy(self):
        copy = type(self).__new__(type(self))
        copy.__dict__.update(self.__dict__)
        Hook.__init__(copy)
        copy._module = None
        return copy

    def overrides(self, config):
        raise NotImplementedError

    def prepare(self, module):
        """Raise for modules this rule cannot take."""

    def register(self, module):
        config = getattr(module, 'config', None)
        if config is None:
            raise TypeError(f'{type(module).__name__} has no config; it is not a transformers module this rule takes')
        if isinstance(config, ConfigView):
            raise RuntimeError(f'{type(module).__name__} already has an lxt_ext rule registered')
        self.prepare(module)
        self._module = module
        module.config = ConfigView(config, self, **self.overrides(config))
        return RemovableHandleList([RemovableHandle(self)])

    def remove(self):
        super().remove()
        module, self._module = self._module, None
        if module is not None and isinstance(module.config, ConfigView):
            module.config = module.config._lxt_ext_config


def wants_relevance(hook, *tensors):
    """The same rule as SwappedForward: plain without a backward, or with the rule made inactive."""
    return hook.active and torch.is_grad_enabled() and any(t.requires_grad for t in tensors)

