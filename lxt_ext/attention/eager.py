"""Attention computed eagerly with LRP rules on its pieces, for variants the fused op does not take.

``eager_attention``: Gemma 2's attention softcap ``c tanh(s / c)`` gets the identity rule (a monotone element-wise
map of the scores); attention sinks (GPT-OSS, Granite-SWA, MiMo: a learnt logit per head, a column the softmax
normalises over and the output drops) are a constant column. AttnLRP there: the uniform rule on both matrix
products (``uniform_matmul``), the softmax rule (``softmax_rule``); CP-LRP: the attention weights constant.
"""
import torch

from .._docstrings import shared_parameters
from ..checks import first_order
from ..ops import ATTNLRP_FACTORS, attention_mode
from ..transformer.elementwise import INPUT_STABILIZER, identity_rule

__all__ = ['eager_attention', 'uniform_matmul', 'softmax_rule']


class _UniformMatmul(torch.autograd.Function):
    """``a @ b``; backward the uniform rule: ``g_a = s g b^T``, ``g_b = s a^T g`` with the uniform share ``s = 1/2``."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a @ b

    @staticmethod
    @first_order
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        share = ATTNLRP_FACTORS['uniform_share']
        return (grad @ b.transpose(-2, -1)) * share, (a.transpose(-2, -1) @ grad) * share


class _SoftmaxRule(torch.autograd.Function):
    """``y = softmax(x)`` over the last dimension (in float32 at least, as transformers' eager attention); backward
    AttnLRP's softmax rule ``R_in = x (R_out - y sum(R_out))``, which in the Gradient x Input convention
    (``R = t g_t``) is the softmax's own gradient: ``g_in = y (g_out - sum(y g_out))``."""

    @staticmethod
    def forward(ctx, x):
        y = torch.softmax(x, dim=-1, dtype=torch.promote_types(x.dtype, torch.float32))
        ctx.save_for_backward(y)
        ctx.dtype = x.dtype
        return y

    @staticmethod
    @first_order
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        grad = grad.to(y.dtype)
        return (y * (grad - (y * grad).sum(-1, keepdim=True))).to(ctx.dtype)


@shared_parameters('attention_inputs', 'attn_mask', 'attention_scale', 'is_causal', leading=True)
@shared_parameters('attention_mode', 'input_stabilizer')
def eager_attention(query, key, value, attn_mask=None, *, scale=None, is_causal=False, softcap=None, sinks=None,
                    mode='attnlrp', input_stabilizer=INPUT_STABILIZER):
    """``softmax(c tanh(scale Q K^T / c) + M) V`` (Gemma 2's attention softcap ``c``, where given) with an LRP
    backward, eagerly (the N x N scores are formed and kept; the fused op has no softcap and no sinks). AttnLRP: the
    uniform rule on both matrix products, the identity rule on the monotone softcap, the softmax rule (in the
    Gradient x Input convention, the softmax's plain gradient); CP-LRP: the attention weights constant. ``sinks``
    (one logit per query head) join each row of scores as a last column before the softmax, which the output drops.

    Parameters
    ----------
    softcap : float, optional
        Keyword only: the softcap ``c`` (None: none).
    sinks : torch.Tensor, optional
        Keyword only: the attention sinks, (Hq,) (None: none).

    Returns
    -------
    torch.Tensor
        The attention output, (B, Hq, Nq, D).
    """
    attention_mode(mode, 'mode')
    groups = query.shape[1] // key.shape[1]
    key, value = (t.repeat_interleave(groups, dim=1) for t in (key, value))
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    matmul = _UniformMatmul.apply if mode == 'attnlrp' else torch.matmul
    scores = matmul(query, key.transpose(-2, -1)) * scale
    if softcap is not None:
        cap = float(softcap)
        scores = identity_rule(lambda s: torch.tanh(s / cap) * cap, scores, input_stabilizer)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float('-inf')) if attn_mask.dtype == torch.bool else scores + attn_mask
    if is_causal:
        causal = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).triu(1)
        scores = scores.masked_fill(causal, float('-inf'))
    if sinks is not None:  # a constant column: no relevance reaches the sinks' parameter
        column = sinks.detach().to(scores.dtype).reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        scores = torch.cat([scores, column], dim=-1)
    # a query row that sees no key gives 0, as attention_lrp does (its softmax would be 0 / 0)
    blind = torch.isneginf(scores).all(-1, keepdim=True)
    scores = scores.masked_fill(blind, 0.)
    if mode == 'cp':
        weights = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))
        weights = weights.to(query.dtype).detach().masked_fill(blind, 0.)
    else:
        weights = _SoftmaxRule.apply(scores).to(query.dtype).masked_fill(blind, 0.)
    if sinks is not None:
        weights = weights[..., :-1]
    return (weights @ value) if mode == 'cp' else matmul(weights, value)


def uniform_matmul(a, b):
    """``a @ b`` with the uniform rule in backward (half of the relevance to each factor).

    Parameters
    ----------
    a, b : torch.Tensor
        Batched matrices, ``(..., n, k)`` and ``(..., k, m)``.

    Returns
    -------
    torch.Tensor
        ``a @ b``.
    """
    return _UniformMatmul.apply(a, b)


def softmax_rule(x):
    """``softmax(x)`` over the last dimension (float32 at least) with AttnLRP's softmax rule in backward.

    Parameters
    ----------
    x : torch.Tensor
        The scores.

    Returns
    -------
    torch.Tensor
        The softmax, in float32 (float64 for float64 scores).
    """
    return _SoftmaxRule.apply(x)
