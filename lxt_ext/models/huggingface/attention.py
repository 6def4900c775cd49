"""transformers' attention modules under AttnLRP or CP-LRP.

transformers (4.48 and later, 5.x) routes every attention call of LLaMA, Qwen, Gemma, Mistral, GPT-2, BERT,
T5, ViT, CLIP, SigLIP, DINOv2, ... through ``ALL_ATTENTION_FUNCTIONS[module.config._attn_implementation]``.
lxt_ext registers two entries there (``lxt_ext_attnlrp``, ``lxt_ext_cp``), and ``HFAttention`` points one
module, and only that module, at them (``lxt_ext.core.ConfigView``). The fused op then does the AttnLRP (or
CP-LRP) backward without an N x N matrix. T5's relative position bias is a constant added to the scores (an
additive mask of the fused op). Gemma 2's attention softcap and attention sinks (GPT-OSS, Granite-SWA) go to
``lxt_ext.attention.eager_attention``.
"""
import sys

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from ..._docstrings import shared_parameters
from ...attention import attention_lrp, eager_attention
from ...core import ConfigViewRule, rule_of
from ...ops import attention_mode
from ...ops.masks import additive_from_attend
from ...transformer.elementwise import INPUT_STABILIZER
from .registry import IMPLEMENTATIONS
from ...errors import NotExplainableError

__all__ = ['HFAttention']


def _original_attention(module, config):
    """The attention function the module would use without lxt_ext."""
    eager = getattr(sys.modules[type(module).__module__], 'eager_attention_forward', None)
    return ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager)


def _selected_keys(indices, attention_mask, causal, query, key):
    """DeepSeek's sparse attention (V3.2, GLM-5's DSA): each query attends to the keys its indexer selected
    (``indices``, ``(B, N, top-k)``), as transformers' eager path masks them: the mask with the others masked out
    (and the causal flag written into it), and no causal flag."""
    batch, length, keys = query.shape[0], query.shape[2], key.shape[2]
    masked = torch.ones(batch, length, keys, dtype=torch.bool, device=query.device)
    masked = masked.scatter(-1, indices.long(), False).unsqueeze(1)  # True: not selected
    if causal:
        masked = masked | torch.ones(length, keys, dtype=torch.bool, device=query.device).triu(1 + keys - length)
    if attention_mask is None or attention_mask.dtype == torch.bool:
        attend = ~masked if attention_mask is None else attention_mask & ~masked
        return additive_from_attend(attend, query.dtype, torch.finfo(query.dtype).min), False
    return attention_mask.masked_fill(masked, torch.finfo(attention_mask.dtype).min), False


def _attention(mode):
    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
        """``(B, H, N, D)`` query, key, value -> ``((B, N, H, D) output, None)``, as transformers'
        sdpa_attention_forward, with the causal flag decided the same way."""
        view = module.config
        hook = rule_of(module)
        if not hook.wants_relevance(query, key, value):
            return _original_attention(module, view._lxt_ext_config)(
                module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal,
                **kwargs)
        sinks = kwargs.get('s_aux', kwargs.get('sinks'))
        if kwargs.get('output_attentions'):
            raise NotExplainableError(
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
        if kwargs.get('indices') is not None:
            attention_mask, causal = _selected_keys(kwargs['indices'], attention_mask, causal, query, key)
        bias = kwargs.get('position_bias')
        if bias is not None:
            # T5's relative position bias: a function of the positions only, off the relevance path
            bias = bias.detach()[:, :, :, :key.shape[2]]
            # transformers' own fill for masked positions
            mask = additive_from_attend(attention_mask, query.dtype, torch.finfo(query.dtype).min)
            attention_mask = bias if mask is None else bias + mask
        # the fused op takes one head dimension for query, key and value (MLA's values are narrower: GLM-4-MoE-Lite)
        if kwargs.get('softcap') is not None or sinks is not None or value.shape[-1] != query.shape[-1]:
            output = eager_attention(query, key, value, attention_mask, scale=scaling, is_causal=causal,
                                     softcap=kwargs.get('softcap'), sinks=sinks, mode=mode,
                                     input_stabilizer=hook.input_stabilizer)
        else:
            output = attention_lrp(query, key, value, attention_mask, scale=scaling, is_causal=causal, mode=mode)
        return output.transpose(1, 2).contiguous(), None
    attention.__name__ = f'lxt_ext_{mode}_attention'
    return attention


for _mode, _name in IMPLEMENTATIONS.items():
    AttentionInterface.register(_name, _attention(_mode))



@shared_parameters('attention', 'input_stabilizer')
class HFAttention(ConfigViewRule):
    """AttnLRP or CP-LRP on one transformers attention module (any module that dispatches through
    ``ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]``); ``input_stabilizer`` serves the identity
    rule on an attention softcap (``lxt_ext.attention.eager_attention``)."""

    def __init__(self, attention='attnlrp', input_stabilizer=INPUT_STABILIZER):
        super().__init__()
        attention_mode(attention)
        self.attention = attention
        self.input_stabilizer = input_stabilizer

    def overrides(self, config):
        return {'_attn_implementation': IMPLEMENTATIONS[self.attention]}
