"""The names lxt_ext registers in transformers' attention- and experts-function registries, by attention mode.

A rule points one module, and only that module, at them by giving it a view of its config
(``lxt_ext.core.ConfigViewRule``) whose ``_attn_implementation`` (or ``_experts_implementation``) names
lxt_ext's entry; the entry finds the module's rule with ``lxt_ext.core.rule_of``.
"""
from ...ops import ATTENTION_MODES

__all__ = ['IMPLEMENTATIONS']

IMPLEMENTATIONS = {mode: f'lxt_ext_{mode}' for mode in ATTENTION_MODES}
