"""timm's Vision Transformers in lxt_ext's transformer composites: the per-architecture table.

timm's ``Attention`` computes ``softmax(q k^T / sqrt(d)) v`` functionally (SDPA or matmuls), out of
zennit's reach; its rule re-runs the same forward with the attention through lxt_ext's fused
AttnLRP/CP-LRP op, keeping ``qkv``, ``q_norm``/``k_norm``, ``norm`` and ``proj`` as modules so
that their own rules apply. timm's LayerNorm/RmsNorm normalise the last dimensions like torch's
(identity rule on the normalisation); LayerScale, DropPath and PatchDropout are linear in the
relevance-carrying input (plain gradient). Blocks that compute attention or gated products
functionally in their own forward (parallel-scaling blocks, GLU and SwiGLU MLPs, and every module not named here)
get their operations' rules from ``lxt_ext.operations``.
"""
import torch
from timm.layers import Attention, DropPath, LayerNorm, LayerScale, PatchDropout, RmsNorm

from ..attention import attention_lrp
from ..core import SwappedForward, call_arguments
from ..transformer.elementwise import identity_rule, uniform_product
from ..transformer.norms import NormIdentity
from . import KeepGradient, adapter


class TimmAttention(SwappedForward):
    """timm's ``Attention`` with the attention core under AttnLRP (``'attnlrp'``) or CP-LRP
    (``'cp'``); the optional sigmoid output gate gets the identity rule on the sigmoid and the
    uniform rule on the product (AttnLRP), or is held constant (CP-LRP). Dropout is off."""

    def __init__(self, attention='attnlrp'):
        super().__init__()
        self.attention = attention

    def apply(self, module, original, x, args, kwargs):
        # attn_mask as SDPA takes it (bool: True = attend, or additive), which is attention_lrp's convention
        arguments = call_arguments(type(module).forward, module, x, *args, **kwargs)
        attn_mask, is_causal = arguments.get('attn_mask'), arguments.get('is_causal', False)
        B, N, _ = x.shape
        qkv = module.qkv(x).reshape(B, N, 3, module.num_heads, module.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = module.q_norm(q), module.k_norm(k)
        out = attention_lrp(q, k, v, attn_mask, scale=module.scale, is_causal=is_causal, mode=self.attention)
        out = module.norm(out.transpose(1, 2).reshape(B, N, module.attn_dim))
        if module.gate is not None:
            gate = module.gate(x)
            if self.attention == 'attnlrp':
                out = uniform_product(out, identity_rule(torch.sigmoid, gate))
            else:
                out = out * gate.sigmoid().detach()
        return module.proj(out)


@adapter(Attention)
def _attention(module, options):
    return TimmAttention(options.attention)


@adapter(LayerNorm)
def _layer_norm(module, options):
    return NormIdentity(kind='layer_norm')


@adapter(RmsNorm)
def _rms_norm(module, options):
    return NormIdentity(kind='rms_norm')


@adapter(LayerScale, DropPath, PatchDropout)
def _linear(module, options):
    return KeepGradient()
