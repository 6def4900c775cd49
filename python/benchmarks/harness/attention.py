"""The attention benchmark's methods (batch 1, D = 64, float32), forward+backward of one attention:

- ``lxt_ext``: ``lxt_ext.attention.attention_lrp(q, k, v, mode='attnlrp')`` (its default rule: ATen's
  fused kernels here); ``lxt_ext_own``: the same on lxt_ext's own kernels (``backend='lxt_ext'``);
- ``lxt_ext_cp``: ``mode='cp'`` (its default rule: the own dV-only kernels on the CPU);
  ``lxt_ext_cp_aten``: CP-LRP on ATen's kernels (``backend='aten'``);
- ``lxt_eager``: what LXT 2.1 runs (HF's eager_attention_forward after ``divide_gradient`` on q, k,
  v): matmul, softmax, matmul, with the gradients of q and k divided by 4 and of v by 2 -- the
  same AttnLRP relevance, through the N x N matrices;
- ``sdpa``: plain ``torch.nn.functional.scaled_dot_product_attention`` forward+backward (the
  exact gradient, no LRP), the floor.
"""
import torch
import torch.nn.functional as F

METHODS = ('lxt_ext', 'lxt_ext_own', 'lxt_ext_cp', 'lxt_ext_cp_aten', 'lxt_eager', 'sdpa')
_LXT_EXT = {'lxt_ext': ('attnlrp', None), 'lxt_ext_own': ('attnlrp', 'lxt_ext'), 'lxt_ext_cp': ('cp', None),
            'lxt_ext_cp_aten': ('cp', 'aten')}
D = 64


class DivideGradient(torch.autograd.Function):
    """LXT's divide_gradient: identity forward, gradient / factor backward."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad / ctx.factor, None


def lxt_eager(q, k, v):
    """LXT 2.1's AttnLRP recipe: the eager attention with divided gradients."""
    q, k, v = DivideGradient.apply(q, 4.0), DivideGradient.apply(k, 4.0), DivideGradient.apply(v, 2.0)
    weights = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5
    weights = torch.softmax(weights, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(weights, v)


def attention(method):
    """``f(q, k, v) -> output`` of a method; backward of the output gives its relevance gradient."""
    if method in _LXT_EXT:
        from lxt_ext.attention import attention_lrp
        mode, backend = _LXT_EXT[method]
        return lambda q, k, v: attention_lrp(q, k, v, mode=mode, backend=backend)
    if method == 'sdpa':
        return F.scaled_dot_product_attention
    if method == 'lxt_eager':
        return lxt_eager
    raise ValueError(f'unknown attention method {method!r}; choose one of {METHODS}')


def make_inputs(n, heads):
    """Seeded q, k, v (1 x heads x n x D, requiring grad) and the output gradient."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, D, requires_grad=True) for _ in range(3))
    return q, k, v, torch.randn(1, heads, n, D)


def run_once(f, q, k, v, g):
    """One forward+backward of ``f``; the gradients land in q.grad, k.grad, v.grad."""
    q.grad = k.grad = v.grad = None
    f(q, k, v).backward(g)
