"""The mechanism under every lxt_ext rule.

- ``hooks``: ``RuleHook``, the one base of every rule (the module's mark read by ``rule_of``, ``copy``, the gate
  ``wants_relevance``, a swapped forward restored on removal); ``SwappedForward`` (the module's forward as an
  autograd Function of the rule), ``KeepGradient`` and ``Refused``;
- ``config_view``: rules that reach a module through a view of its config;
- ``products``: the rules of layers ``y = W x + b`` (``ProductRule``, ``FusedRule`` over the extension op);
- ``shared``: what rules tell each other about the tensors of one forward pass (``SHARED``).
"""
from .config_view import ConfigView, ConfigViewRule
from .hooks import KeepGradient, Refused, RuleHook, SwappedForward, call_arguments, rule_of, wants_relevance
from .products import CONVENTIONS, LOW_PRECISION, FusedRule, ProductRule, epsilon_of, zeroes_bias
from .shared import SHARED, SharedTensors

__all__ = ['RuleHook', 'SwappedForward', 'KeepGradient', 'Refused', 'ConfigView', 'ConfigViewRule', 'ProductRule',
           'FusedRule', 'SharedTensors', 'SHARED', 'CONVENTIONS', 'LOW_PRECISION', 'rule_of', 'wants_relevance',
           'call_arguments', 'epsilon_of', 'zeroes_bias']
