"""Hugging Face transformers in lxt_ext's transformer composites: the per-architecture table.

Attention. transformers (4.48 and later, 5.x) routes every attention call of LLaMA, Qwen, Gemma,
Mistral, GPT-2, BERT, ViT, ... through ``ALL_ATTENTION_FUNCTIONS[module.config._attn_implementation]``.
lxt_ext registers two entries there (``lxt_ext_attnlrp``, ``lxt_ext_cp``), and the attention rule
points one module, and only that module, at them by giving it a view of its config whose
``_attn_implementation`` names lxt_ext's entry. Nothing global is patched; removing the rule
gives the module its own config object back. The fused op then does the AttnLRP (or CP-LRP)
backward without an N x N matrix.

MLPs. Gated MLPs (``down(act(gate(x)) * up(x))``, LLaMA/Qwen/Mistral/Gemma) get the uniform rule
on the product (AttnLRP) or a gate held constant (CP-LRP, as LXT); activation modules get the
identity rule; RMSNorms the identity rule on the normalisation; GPT-2's ``Conv1D`` (``x W + b``)
the composite's Linear rule. Models are matched by class name (no modeling module is imported)
with a structural fallback for attention modules of architectures not named here.
"""
import sys

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface
from zennit.core import Hook, RemovableHandle, RemovableHandleList

from ..attention import attention_lrp
from ..core import SwappedForward
from ..ops import ATTENTION_MODES
from ..transformer.convention import linear_rule_apply
from ..transformer.elementwise import ActivationIdentity, DropoutOff, uniform_product
from ..transformer.norms import NormIdentity
from . import KeepGradient, matcher

# The entries lxt_ext adds to transformers' attention-function registry, by attention mode.
_IMPLEMENTATIONS = {mode: f'lxt_ext_{mode}' for mode in ATTENTION_MODES}


class _ConfigView:
    """A module's config with lxt_ext's attention implementation; everything else reads through."""

    def __init__(self, config, implementation, hook):
        object.__setattr__(self, '_lxt_ext_config', config)
        object.__setattr__(self, '_attn_implementation', implementation)
        object.__setattr__(self, '_lxt_ext_hook', hook)

    def __getattr__(self, name):
        return getattr(self._lxt_ext_config, name)

    def __setattr__(self, name, value):
        setattr(self._lxt_ext_config, name, value)


def _original_attention(module, config):
    """The attention function the module would use without lxt_ext."""
    eager = getattr(sys.modules[type(module).__module__], 'eager_attention_forward', None)
    return ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager)


def _attention(mode):
    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
        """``(B, H, N, D)`` query, key, value -> ``((B, N, H, D) output, None)``, as transformers'
        sdpa_attention_forward, with the causal flag decided the same way."""
        view = module.config
        hook = view._lxt_ext_hook
        wants_relevance = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
        if not (hook.active and wants_relevance):  # the same rule as SwappedForward: plain without a backward
            return _original_attention(module, view._lxt_ext_config)(
                module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal,
                **kwargs)
        for unsupported in ('softcap', 'position_bias', 's_aux', 'sinks'):
            if kwargs.get(unsupported) is not None:
                raise NotImplementedError(
                    f'{type(module).__name__}: lxt_ext attention does not support {unsupported!r} yet; '
                    f'map this module to another rule or leave it out of the composite')
        if kwargs.get('output_attentions'):
            raise NotImplementedError(
                f'{type(module).__name__}: output_attentions=True would need the N x N attention matrix, which '
                f'lxt_ext never forms; call the model without it')
        q_length, kv_length = query.shape[2], key.shape[2]
        causal = getattr(module, 'is_causal', True) if is_causal is None else is_causal
        causal = bool(q_length > 1 and attention_mask is None and causal)
        if causal and kv_length > q_length:
            # prefill of an empty static cache: the keys beyond the queries are masked anyway
            key, value = key[:, :, :q_length], value[:, :, :q_length]
        if attention_mask is not None and attention_mask.dim() == 4:
            attention_mask = attention_mask[:, :, :, :key.shape[2]]
        output = attention_lrp(query, key, value, attention_mask, scale=scaling, is_causal=causal, mode=mode)
        return output.transpose(1, 2).contiguous(), None
    attention.__name__ = f'lxt_ext_{mode}_attention'
    return attention


for _mode, _name in _IMPLEMENTATIONS.items():
    AttentionInterface.register(_name, _attention(_mode))


class HFAttention(Hook):
    """AttnLRP or CP-LRP on one transformers attention module (any module that dispatches through
    ``ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]``)."""

    def __init__(self, mode='attnlrp'):
        super().__init__()
        if mode not in _IMPLEMENTATIONS:
            raise ValueError(f"mode must be one of {sorted(_IMPLEMENTATIONS)}, got {mode!r}")
        self.mode = mode
        self._module = None

    def copy(self):
        return type(self)(self.mode)

    def register(self, module):
        config = getattr(module, 'config', None)
        if config is None:
            raise TypeError(f'{type(module).__name__} has no config; it is not a transformers attention module')
        if isinstance(config, _ConfigView):
            raise RuntimeError(f'{type(module).__name__} already has an lxt_ext attention rule registered')
        self._module = module
        module.config = _ConfigView(config, _IMPLEMENTATIONS[self.mode], self)
        return RemovableHandleList([RemovableHandle(self)])

    def remove(self):
        super().remove()
        module, self._module = self._module, None
        if module is not None and isinstance(module.config, _ConfigView):
            module.config = module.config._lxt_ext_config


class GatedMLP(SwappedForward):
    """``down(act(gate(x)) * up(x))``. AttnLRP: the uniform rule on the product (half of the relevance
    to each factor). CP-LRP (as LXT): the gate is held constant, all relevance goes through ``up``.
    The projections and the activation stay modules, so their own rules apply."""

    def __init__(self, mode='attnlrp'):
        super().__init__()
        self.mode = mode

    def prepare(self, module):
        missing = [name for name in ('gate_proj', 'up_proj', 'down_proj', 'act_fn') if not hasattr(module, name)]
        if missing:
            raise TypeError(f'{type(module).__name__} is not a gated MLP: it lacks {missing}')

    def apply(self, module, original, input, args, kwargs):
        if args or kwargs:
            raise TypeError(f'{type(module).__name__}: a gated MLP takes one input, got more')
        gate = module.act_fn(module.gate_proj(input))
        up = module.up_proj(input)
        product = uniform_product(gate, up) if self.mode == 'attnlrp' else gate.detach() * up
        return module.down_proj(product)


class Conv1DRule(SwappedForward):
    """transformers' ``Conv1D`` (GPT-2): ``y = x W + b`` with ``W`` of shape (in, out), i.e. a Linear
    layer with weight ``W^T``, under the composite's Linear rule."""

    def __init__(self, linear_rule):
        super().__init__()
        self.linear_rule = linear_rule

    def apply(self, module, original, input, args, kwargs):
        return linear_rule_apply(self.linear_rule, input, module.weight.t(), module.bias)


# Classes by name, so that supporting an architecture imports nothing. Attention modules of
# architectures not named here are found by _dispatches_attention below.
_ATTENTION = {
    'LlamaAttention', 'MistralAttention', 'Qwen2Attention', 'Qwen3Attention', 'Gemma3Attention', 'GemmaAttention',
    'Gemma2Attention', 'Phi3Attention', 'GPT2Attention', 'BertSelfAttention', 'ViTSelfAttention', 'ViTAttention',
}
_GATED_MLP = {'LlamaMLP', 'MistralMLP', 'Qwen2MLP', 'Qwen3MLP', 'GemmaMLP', 'Gemma2MLP', 'Gemma3MLP'}
_RMS_NORM = {'LlamaRMSNorm': 0., 'MistralRMSNorm': 0., 'Qwen2RMSNorm': 0., 'Qwen3RMSNorm': 0., 'Phi3RMSNorm': 0.,
             'GemmaRMSNorm': 1., 'Gemma2RMSNorm': 1., 'Gemma3RMSNorm': 1.}
_ACTIVATIONS = {
    'GELUActivation', 'NewGELUActivation', 'GELUTanh', 'PytorchGELUTanh', 'FastGELUActivation', 'QuickGELUActivation',
    'AccurateGELUActivation', 'ClippedGELUActivation', 'SiLUActivation', 'MishActivation', 'ReLUSquaredActivation',
    'LaplaceActivation',
}
# Off the relevance path (position tables) or linear in their relevance-carrying input.
_KEEP_GRADIENT = {'LinearActivation', 'LlamaRotaryEmbedding', 'MistralRotaryEmbedding', 'Qwen2RotaryEmbedding',
                  'Qwen3RotaryEmbedding', 'GemmaRotaryEmbedding', 'Gemma2RotaryEmbedding', 'Gemma3RotaryEmbedding',
                  'Phi3RotaryEmbedding', 'Gemma3TextScaledWordEmbedding'}


def _dispatches_attention(module):
    """Whether the module's forward goes through transformers' attention-function registry."""
    modeling = sys.modules.get(type(module).__module__)
    return (hasattr(module, 'config') and getattr(modeling, 'ALL_ATTENTION_FUNCTIONS', None) is not None
            and type(module).__name__.endswith('Attention') and 'attention_interface' in
            type(module).forward.__code__.co_varnames)


@matcher
def transformers_rule(module, options):
    cls = type(module)
    if not cls.__module__.startswith('transformers.'):
        return None
    name = cls.__name__
    if name in _ATTENTION or (name not in _GATED_MLP and _dispatches_attention(module)):
        return HFAttention(options.attention)
    if name in _GATED_MLP:
        return GatedMLP(options.attention)
    if name in _RMS_NORM:
        return NormIdentity(kind='rms_norm', weight_offset=_RMS_NORM[name])
    if name in _ACTIVATIONS:
        return ActivationIdentity(options.input_stabilizer)
    if name == 'Conv1D':
        if options.linear is None:
            raise ValueError('transformers Conv1D layers need the composite\'s Linear rule (Options.linear)')
        return Conv1DRule(options.linear.copy())
    if name in _KEEP_GRADIENT:
        return KeepGradient()
    if isinstance(module, torch.nn.Dropout):
        return DropoutOff()
    return None
