"""Fused attention whose backward is an LRP rule: ``attention_lrp``.

Forward is ``O = softmax(scale * Q K^T + M) V`` (torch SDPA's semantics). Backward, in the
Gradient x Input convention (the gradient slot carries relevance per unit of the tensor):

- ``mode='attnlrp'`` (AttnLRP, Achtibat et al. 2024): the exact attention gradient with dV scaled
  by 1/2 and dQ, dK by 1/4: ``dV = 1/2 P^T dO``, ``dS = P * (dO V^T - rowsum(dO * O))``,
  ``dQ = scale/4 dS K``, ``dK = scale/4 dS^T Q``;
- ``mode='cp'`` (CP-LRP): ``dV = P^T dO`` and no relevance through Q and K (their gradients are
  None, never computed).

Only O (AttnLRP) and two statistics per query row (row max and log row sum of the softmax) are
kept for backward, which recomputes the scores tile by tile: extra memory grows linearly in the sequence
length, the N x N attention matrix is never stored.
"""
import math

import torch

from .checks import first_order
from . import ops


class _AttentionLRP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, attn_mask, scale, is_causal, mode):
        out, stats = ops.lib.attention_forward(query, key, value, attn_mask, scale, is_causal)
        # CP-LRP's backward (dV = P^T dO) never reads O: keep a stride-0 stand-in of its shape, which
        # is all the op checks, instead of an activation-sized tensor per attention layer.
        kept = out if mode != ops.ATTENTION_MODES['cp'] else out.new_zeros(()).expand(out.shape)
        ctx.save_for_backward(query, key, value, attn_mask, kept, stats)
        ctx.scale, ctx.is_causal, ctx.mode = scale, is_causal, mode
        return out

    @staticmethod
    @first_order
    def backward(ctx, grad_out):
        query, key, value, attn_mask, out, stats = ctx.saved_tensors
        grads = ops.lib.attention_backward(grad_out, query, key, value, attn_mask, out, stats, ctx.scale,
                                            ctx.is_causal, ctx.mode)
        if ctx.mode == ops.ATTENTION_MODES['cp']:
            return None, None, grads[0], None, None, None, None
        return grads[0], grads[1], grads[2], None, None, None, None


def attention_lrp(query, key, value, attn_mask=None, *, scale=None, is_causal=False, mode='attnlrp'):
    """Attention ``softmax(scale * query @ key^T + attn_mask) @ value`` with an LRP backward.

    ``query`` (B, Hq, Nq, D); ``key``, ``value`` (B, Hkv, Nk, D) with Hq a multiple of Hkv
    (grouped-query attention); any strides. ``attn_mask``: None, bool (True = attend) or floating
    (added to the scores), broadcastable to (B, Hq, Nq, Nk). ``is_causal``: query i sees keys
    j <= i (torch SDPA's top-left convention); it may be combined with a mask. ``scale`` defaults
    to ``1 / sqrt(D)``. ``mode``: ``'attnlrp'`` or ``'cp'`` (see the module docstring). A query row
    that sees no key gets a zero output and zero gradients.
    """
    if mode not in ops.ATTENTION_MODES:
        raise ValueError(f"attention_lrp: mode must be one of {tuple(ops.ATTENTION_MODES)}, got {mode!r}")
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    return _AttentionLRP.apply(query, key, value, attn_mask, float(scale), bool(is_causal), ops.ATTENTION_MODES[mode])
