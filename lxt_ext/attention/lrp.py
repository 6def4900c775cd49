"""Fused attention whose backward is an LRP rule: ``attention_lrp``.

Forward is ``O = softmax(scale * Q K^T + M) V`` (torch SDPA's semantics). Backward, in the
Gradient x Input convention (the gradient slot carries relevance per unit of the tensor):

- ``mode='attnlrp'`` (AttnLRP, Achtibat et al. 2024): the exact attention gradient with dV scaled
  by 1/2 and dQ, dK by 1/4: ``dV = 1/2 P^T dO``, ``dS = P * (dO V^T - rowsum(dO * O))``,
  ``dQ = scale/4 dS K``, ``dK = scale/4 dS^T Q``;
- ``mode='cp'`` (CP-LRP): ``dV = P^T dO`` and no relevance through Q and K (their gradients are
  None, never computed).

Two backends compute it, chosen per call by devices, dtypes, shapes and the mask's kind, never by
values (``lxt_ext.ops.fused_attention``, which documents the rule; ``backend=`` or
``$LXT_EXT_ATTENTION_BACKEND`` forces either): PyTorch's own fused attention kernels (ATen's flash
attention on the CPU; flash, memory-efficient or cuDNN on CUDA) with the rescaling applied to dO,
and lxt_ext's own tiled kernels (``torch.ops.lxt_ext.attention_forward/backward``, csrc/attention),
which serve float64 and whatever ATen's kernels refuse, and CP-LRP's backward on the CPU (dV only,
after ATen's forward). Either keeps only the inputs, O (not for CP-LRP's own backward) and one or two
numbers per query row for backward, which recomputes the scores tile by tile: extra memory grows
linearly in the sequence length, the N x N attention matrix is never stored.
"""
import math

import torch

from .._docstrings import shared_parameters

from .. import ops
from ..checks import first_order
from ..ops import fused_attention


class _AttentionLRP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, attn_mask, scale, is_causal, mode, plan):
        aux = None  # what ATen's CUDA kernels pass from forward to backward
        if plan == 'own':
            out, stats = ops.lib.attention_forward(query, key, value, attn_mask, scale, is_causal)
        else:
            out, stats, aux = fused_attention.forward(query, key, value, attn_mask, scale, is_causal)
        # The own CP-LRP backward (dV = P^T dO) never reads O: keep a stride-0 stand-in of its shape, which
        # is all the op checks, instead of an activation-sized tensor per attention layer.
        own_cp = mode == ops.ATTENTION_MODES['cp'] and plan != 'aten'
        kept = out.new_zeros(()).expand(out.shape) if own_cp else out
        ctx.save_for_backward(query, key, value, attn_mask, kept, stats)
        ctx.scale, ctx.is_causal, ctx.mode, ctx.plan, ctx.aux = scale, is_causal, mode, plan, aux
        return out

    @staticmethod
    @first_order
    def backward(ctx, grad_out):
        query, key, value, attn_mask, out, stats = ctx.saved_tensors
        cp = ctx.mode == ops.ATTENTION_MODES['cp']
        rows = query.shape, key.shape[2], ctx.is_causal
        if ctx.plan == 'aten':
            factor = fused_attention.row_factor(stats, attn_mask, *rows)
            grads = fused_attention.backward(grad_out, query, key, value, attn_mask, out, stats, ctx.aux, ctx.scale,
                                             ctx.is_causal, cp, factor)
        else:
            if ctx.plan == 'aten_forward':
                stats = fused_attention.own_statistics(stats, attn_mask, *rows)
            grads = ops.lib.attention_backward(grad_out, query, key, value, attn_mask, out, stats, ctx.scale,
                                                ctx.is_causal, ctx.mode)
        if cp:
            return None, None, grads[0], None, None, None, None, None
        return grads[0], grads[1], grads[2], None, None, None, None, None


@shared_parameters('attention_inputs', 'attn_mask', 'attention_scale', 'is_causal', 'attention_mode', leading=True)
def attention_lrp(query, key, value, attn_mask=None, *, scale=None, is_causal=False, mode='attnlrp', backend=None):
    """Attention ``softmax(scale * query @ key^T + attn_mask) @ value`` with an LRP backward (the rules of
    ``mode``: see the module docstring). A query row that sees no key gets a zero output and zero gradients.

    Parameters
    ----------
    backend : {'auto', 'aten', 'lxt_ext'}, optional
        Keyword only: ``'auto'`` (PyTorch's fused kernels where the rule of ``lxt_ext.ops.fused_attention``
        picks them), ``'aten'`` (wherever they can take the call) or ``'lxt_ext'`` (always the own kernels);
        None (default) reads ``$LXT_EXT_ATTENTION_BACKEND``, else ``'auto'``.

    Returns
    -------
    torch.Tensor
        The attention output, (B, Hq, Nq, D).
    """
    code = ops.attention_mode(mode, 'mode')
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    scale, is_causal, cp = float(scale), bool(is_causal), mode == 'cp'
    # unit stride along the head dimension: ATen's CPU flash kernel (torch 2.14) returns wrong outputs for other
    # layouts (LowFormer's q, k, v, viewed out of a channels-first convolution), which F.sdpa copies first
    query, key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))
    # what gets no gradient leaves the graph here (the mask always, the query and key under CP-LRP), so that a walk
    # of the graph (lxt_ext.operations' refusals) does not find what no relevance reaches through this op
    if attn_mask is not None:
        attn_mask = attn_mask.detach()
    if cp:
        query, key = query.detach(), key.detach()
    plan = fused_attention.plan(query, key, value, attn_mask, scale, is_causal, cp, fused_attention.resolve(backend))
    return _AttentionLRP.apply(query, key, value, attn_mask, scale, is_causal, code, plan)
