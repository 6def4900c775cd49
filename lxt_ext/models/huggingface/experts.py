"""transformers 5's mixture-of-experts modules.

transformers 5 keeps the experts of a block as one module with 3-D ``gate_up_proj``/``down_proj`` parameters
run through ``ALL_EXPERTS_FUNCTIONS[config._experts_implementation]``; ``HFExperts`` points the module at
lxt_ext's entries there (``lxt_ext.core.ConfigView``), which run each expert's projections under the composite's
Linear rule and its gated product under the gated-MLP rule. The routing weights are constants
(``lxt_ext.transformer.experts``). Qwen2-MoE's shared expert: ``SharedExpertMoE``.
"""
import torch

from ..._docstrings import shared_parameters
from ...transformer.convention import linear_rule_apply
from ...transformer.experts import ExpertsRule
from ...transformer.mlp import gated_product
from ...core import ConfigViewRule, SwappedForward, rule_of
from .registry import IMPLEMENTATIONS
from ...errors import NotExplainableError

try:  # transformers 5: experts as one module with 3-D weights, dispatched through a registry
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface, _default_apply_gate
except ImportError:  # pragma: no cover - transformers 4.x keeps experts as a ModuleList of MLPs
    ALL_EXPERTS_FUNCTIONS = ExpertsInterface = _default_apply_gate = None

__all__ = ['HFExperts', 'SharedExpertMoE', 'ALL_EXPERTS_FUNCTIONS']


def _experts(mode):
    def experts(module, hidden_states, top_k_index, top_k_weights):
        """transformers 5's experts forward ``(tokens, hidden)`` -> ``(tokens, hidden)`` with each
        expert under the composite's rules and the routing weights as constants."""
        view = module.config
        hook = rule_of(module)
        if not hook.wants_relevance(hidden_states):
            original = ALL_EXPERTS_FUNCTIONS.get_interface(view._lxt_ext_config._experts_implementation,
                                                           type(module).forward.__wrapped__)
            return original(module, hidden_states, top_k_index, top_k_weights)
        return _experts_lrp(module, hook, hidden_states, top_k_index, top_k_weights.detach())
    experts.__name__ = f'lxt_ext_{mode}_experts'
    return experts


def _expert_linear(module, rule, name, expert, x):
    """``x`` through expert ``expert``'s projection ``name`` (3-D parameter, optional ``name + '_bias'``)."""
    weight = getattr(module, name)[expert]
    bias = getattr(module, f'{name}_bias')[expert] if module.has_bias else None
    return linear_rule_apply(rule, x, weight.t() if module.is_transposed else weight, bias)


def _experts_lrp(module, hook, hidden_states, top_k_index, top_k_weights):
    """Token-expert pairs sorted by expert, each expert's MLP on its tokens, the outputs scaled by the
    (constant) routing weights and summed per token. Only linear operations join the pieces (index,
    cat, sum), so autograd carries relevance through them exactly."""
    tokens, k = top_k_index.shape
    expert_ids = top_k_index.reshape(-1)
    order = torch.argsort(expert_ids, stable=True)
    counts = torch.bincount(expert_ids, minlength=module.num_experts).tolist()
    pieces = []
    for expert, x in enumerate(hidden_states[order // k].split(counts)):
        if not counts[expert]:
            continue
        if module.has_gate:
            gate, up = _expert_linear(module, hook.linear, 'gate_up_proj', expert, x).chunk(2, dim=-1)
            h = gated_product(module.act_fn(gate), up, hook.attention)
        else:
            h = module.act_fn(_expert_linear(module, hook.linear, 'up_proj', expert, x))
        pieces.append(_expert_linear(module, hook.linear, 'down_proj', expert, h))
    weighted = torch.cat(pieces) * top_k_weights.reshape(-1)[order, None].to(hidden_states.dtype)
    return weighted[torch.argsort(order)].view(tokens, k, -1).sum(1).to(hidden_states.dtype)


if ExpertsInterface is not None:
    for _mode, _name in IMPLEMENTATIONS.items():
        ExpertsInterface.register(_name, _experts(_mode))


@shared_parameters('gated_attention', 'linear_rule')
class HFExperts(ExpertsRule, ConfigViewRule):
    """A transformers 5 experts module (``@use_experts_implementation``: 3-D ``gate_up_proj``/``down_proj``,
    dispatched through ``ALL_EXPERTS_FUNCTIONS``): each expert's projections under the composite's
    Linear rule (``linear_rule``), its gated product under the gated-MLP rule of ``attention``, its
    activation module under its own rule; the routing weights are constants (see ``RouterConstant``).
    Custom gates (``_apply_gate`` overridden: GPT-OSS, ...), interleaved gate/up weights, post-expert
    norms and expert parallelism are refused by name. ``linear_rule`` None raises ``ValueError``."""
    covers_operations = True  # the experts function it dispatches to computes the whole forward

    def prepare(self, module):
        super().prepare(module)
        cls = type(module)
        refused = [reason for reason, present in (
            ('its own _apply_gate (a custom gate)', getattr(cls, '_apply_gate', _default_apply_gate)
             is not _default_apply_gate),
            ('interleaved gate/up weights', module.has_gate and not module.is_concatenated),
            ('a post-expert norm', module.has_post_expert_norm),
            ('expert parallelism', module._is_expert_parallel)) if present]
        if refused:
            raise NotExplainableError(f'{cls.__module__}.{cls.__qualname__}: lxt_ext\'s experts rule does not cover '
                                      f'{", ".join(refused)}; leave this model out of the composite')

    def overrides(self, config):
        return {'_experts_implementation': IMPLEMENTATIONS[self.attention]}



class SharedExpertMoE(SwappedForward):
    """Qwen2-MoE's block: routed experts plus a shared expert scaled by ``sigmoid(shared_expert_gate(x))``.
    The shared expert's gate is held constant like the routing weights (see the module doc); the router,
    the experts and the shared expert run as modules under their own rules."""

    def apply(self, module, original, input, args, kwargs):
        batch, length, hidden = input.shape
        x = input.reshape(-1, hidden)
        shared = module.shared_expert(x)
        _, routing_weights, selected = module.gate(x)
        routed = module.experts(x, selected, routing_weights)
        with torch.no_grad():
            scale = torch.sigmoid(module.shared_expert_gate(x))
        return (routed + scale * shared).reshape(batch, length, hidden)
