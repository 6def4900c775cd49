"""Rules that reach a module through its config: while registered, the module's ``config`` is a view
(``ConfigView``) with some attributes replaced (transformers' ``_attn_implementation`` or
``_experts_implementation`` naming lxt_ext's entry of its function registries, a softcap taken over by a rule);
removal gives the module its own config object back. Nothing global is patched.
"""
from .hooks import RuleHook

__all__ = ['ConfigView', 'ConfigViewRule']


class ConfigView:
    """A config with some attributes replaced; everything else reads and writes through.

    Parameters
    ----------
    config : object
        The module's own config.
    **overrides : object
        The replaced attributes.
    """

    def __init__(self, config, **overrides):
        object.__setattr__(self, '_lxt_ext_config', config)
        for name, value in overrides.items():
            object.__setattr__(self, name, value)

    def __getattr__(self, name):
        return getattr(self._lxt_ext_config, name)

    def __setattr__(self, name, value):
        setattr(self._lxt_ext_config, name, value)


class ConfigViewRule(RuleHook):
    """A rule that gives its module a ``ConfigView`` of its config while registered (``overrides``). The module's
    forward still runs its own operations (the view changes only what it dispatches to), so they are left to the
    operation rules (``covers_operations = False``)."""
    covers_operations = False

    def overrides(self, config):
        """The attributes the view replaces.

        Parameters
        ----------
        config : object
            The module's own config.

        Returns
        -------
        dict
        """
        raise NotImplementedError

    def prepare(self, module):
        config = getattr(module, 'config', None)
        if config is None:
            raise TypeError(f'{type(module).__name__} has no config; it is not a transformers module this rule takes')
        if isinstance(config, ConfigView):
            raise RuntimeError(f'{type(module).__name__} already has an lxt_ext rule registered')

    def attach(self, module):
        module.config = ConfigView(module.config, **self.overrides(module.config))

    def detach(self, module):
        if isinstance(module.__dict__.get('config'), ConfigView):
            module.config = module.config._lxt_ext_config
