"""Mixture-of-experts rules that hold the routing constant.

A routing weight multiplies an expert's output, both computed from the same tokens: a product of two
relevance-carrying factors, like a gate. Held constant, as CP-LRP holds the attention weights, all of the
block's relevance flows through the experts, conservation holds, and the top-k selection, piecewise constant,
has no gradient anyway. So the router runs without grad (``RouterConstant``) and gets no relevance.
"""
import torch

from .._docstrings import shared_parameters
from ..core import SwappedForward
from ..ops import attention_mode
from .convention import linear_rule_apply
from .mlp import gated_product

__all__ = ['ExpertsRule', 'DenseExperts', 'RouterConstant']


class ExpertsRule:
    """What every experts rule takes (a base before the rule's mechanism, e.g. ``SwappedForward``).

    Parameters
    ----------
    attention : {'attnlrp', 'cp'}
        The composite's attention rule, which decides the gated products' rule.
    linear_rule : zennit.core.Hook
        The composite's Linear rule, for each expert's projections.
    """

    def __init__(self, attention='attnlrp', linear_rule=None):
        super().__init__()
        attention_mode(attention)
        if linear_rule is None:
            raise ValueError('the experts rule needs the composite\'s Linear rule (Options.linear)')
        self.attention = attention
        self.linear = linear_rule


@shared_parameters('gated_attention', 'linear_rule')
class DenseExperts(ExpertsRule, SwappedForward):
    """Llama 4's experts: every expert on every token, ``(E * T, H)`` inputs already scaled by the (constant)
    router scores; per expert ``down(up * act(gate))`` with ``gate, up = x @ gate_up_proj[e]`` (3-D
    parameters, ``(E, in, out)``): each projection under the composite's Linear rule, the product under
    the gated-MLP rule, the activation module under its own rule."""

    def apply(self, module, original, input, args, kwargs):
        experts = input.view(module.gate_up_proj.shape[0], -1, input.shape[-1])
        outputs = []
        for expert, x in enumerate(experts):
            gate, up = linear_rule_apply(self.linear, x, module.gate_up_proj[expert].t()).chunk(2, dim=-1)
            h = gated_product(module.act_fn(gate), up, self.attention)
            outputs.append(linear_rule_apply(self.linear, h, module.down_proj[expert].t()))
        return torch.stack(outputs).view(-1, input.shape[-1])


class RouterConstant(SwappedForward):
    """A mixture-of-experts router run without grad: its routing weights are constants for the
    experts' outputs they scale, so the router gets no relevance (see the module doc)."""
    checked = False  # its outputs carry no relevance

    def apply(self, module, original, input, args, kwargs):
        with torch.no_grad():
            return original(input, *args, **kwargs)

