"""Gated MLPs ``down(act(gate(x)) * up(x))`` in the Gradient x Input convention: AttnLRP's uniform rule on the
product, or CP-LRP's gate held constant (as LXT). Generic over attribute names, so any library's gated MLP
(transformers' LLaMA/Qwen/Gemma MLPs, DINOv2's SwiGLU, Flan-T5's gated-GELU, Phi-3's fused ``gate_up_proj``)
maps to it by a table entry.
"""
import torch

from .._docstrings import shared_parameters
from ..core import SwappedForward, rule_of
from ..ops import attention_mode
from .elementwise import uniform_product

__all__ = ['gated_product', 'GatedMLP', 'FusedGatedMLP']


def gated_product(gate, up, attention):
    """``gate * up`` of a gated MLP (``gate`` the activation's output): AttnLRP's uniform rule (half
    of the relevance to each factor), or CP-LRP's gate held constant (all relevance through ``up``).

    Parameters
    ----------
    gate, up : torch.Tensor
        The factors.
    attention : {'attnlrp', 'cp'}
        The composite's attention rule, which picks the rule above.

    Returns
    -------
    torch.Tensor
        ``gate * up``.
    """
    return uniform_product(gate, up) if attention == 'attnlrp' else gate.detach() * up


@shared_parameters('gated_attention', 'mlp_names')
class GatedMLP(SwappedForward):
    """``down(act(gate(x)) * up(x))`` (``names``: the attributes of gate, up, down and act; LLaMA's by
    default). AttnLRP: the uniform rule on the product (half of the relevance to each factor). CP-LRP
    (as LXT): the gate is held constant, all relevance goes through ``up``. The projections and the
    activation stay modules, so their own rules apply; a ``dropout`` module after the product is run
    (it is off under the composites)."""

    NAMES = ('gate_proj', 'up_proj', 'down_proj', 'act_fn')
    KIND = 'gated MLP'

    def __init__(self, attention='attnlrp', names=None):
        super().__init__()
        attention_mode(attention)
        self.attention = attention
        self.names = tuple(self.NAMES if names is None else names)

    def prepare(self, module):
        missing = [name for name in self.names if not hasattr(module, name)]
        if missing:
            raise TypeError(f'{type(module).__name__} is not a {self.KIND}: it lacks {missing}')

    def factors(self, module, input):
        """``(act(gate), up, down)`` of ``input``."""
        gate, up, down, act = (getattr(module, name) for name in self.names)
        return act(gate(input)), up(input), down

    def apply(self, module, original, input, args, kwargs):
        if args or kwargs:
            raise TypeError(f'{type(module).__name__}: a gated MLP takes one input, got more')
        gate, up, down = self.factors(module, input)
        product = gated_product(gate, up, self.attention)
        dropout = getattr(module, 'drop', None) or getattr(module, 'dropout', None)
        if isinstance(dropout, torch.nn.Dropout):
            product = dropout(product)
        if down.weight.is_floating_point() and product.dtype != down.weight.dtype:
            product = product.to(down.weight.dtype)  # T5 keeps its output projection in float32
        output = down(product)
        # Model code may add to the MLP's output in place (Llama 4's MoE: out.add_): where down's rule keeps its
        # output for backward, return a fresh tensor (transient: the residual add keeps nothing)
        return output.clone() if getattr(rule_of(down), 'keeps_output', False) else output


@shared_parameters('gated_attention', 'mlp_names')
class FusedGatedMLP(GatedMLP):
    """A gated MLP with one fused input projection: ``down(act(gate) * up)`` with
    ``gate, up = fused(x).chunk(2)`` (``names``: fused, down, act; Phi-3's and GLM's by default,
    ModernBERT's ``Wi``, ``Wo``, ``act``); otherwise ``GatedMLP``."""

    NAMES = ('gate_up_proj', 'down_proj', 'activation_fn')
    KIND = 'fused gated MLP'

    def factors(self, module, input):
        fused, down, act = (getattr(module, name) for name in self.names)
        gate, up = fused(input).chunk(2, dim=-1)
        return act(gate), up, down

