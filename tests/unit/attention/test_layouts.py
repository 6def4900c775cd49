"""Operand layouts torch's CPU kernels get wrong (torch 2.14), which lxt_ext's rules must not inherit: attention
operands whose head dimension is not unit-stride (ATen's flash kernel; LowFormer), and a batch norm's output
gradient in a permuted layout (its backward; CvT's value projection). Oracles: F.scaled_dot_product_attention,
which copies such operands first, and the batch norm's gradient written out, g * weight / sqrt(var + eps)."""
import pytest
import torch
import torch.nn.functional as F

from conftest import assert_rel_close
from lxt_ext.attention import attention_lrp
from lxt_ext.composites import ViTEpsilon


def _transposed(*shape, generator):
    """A (..., N, D) tensor stored (..., D, N): stride N along the head dimension."""
    return torch.randn(*shape[:-2], shape[-1], shape[-2], dtype=torch.float64, generator=generator).transpose(-1, -2)


@pytest.mark.parametrize('mode', ['attnlrp', 'cp'])
def test_attention_with_a_strided_head_dimension(mode, generator):
    q, k, v = (_transposed(1, 2, 49, 32, generator=generator).requires_grad_() for _ in range(3))
    assert q.stride(-1) == 49
    output = attention_lrp(q, k, v, mode=mode)
    assert_rel_close(output.detach(), F.scaled_dot_product_attention(q, k, v).detach(), 1e-12)
    # the relevance of the same operands laid out contiguously (the layout the op's own tests take)
    grad = torch.randn(output.shape, dtype=torch.float64, generator=generator)
    leaves = [t.detach().contiguous().requires_grad_() for t in (q, k, v)]
    expected = torch.autograd.grad(attention_lrp(*leaves, mode=mode), leaves, grad, allow_unused=True)
    actual = torch.autograd.grad(output, (q, k, v), grad, allow_unused=True)
    for a, e in zip(actual, expected):
        if e is None:
            assert a is None or not a.any()
        else:
            assert_rel_close(a, e, 1e-12)


class _Features(torch.nn.Module):
    """A batch norm whose output is returned in a dict (which the output convention leaves as it is: the seed
    arrives at the batch norm unchanged)."""

    def __init__(self):
        super().__init__()
        self.bn = torch.nn.BatchNorm2d(32).eval()  # float32: the vectorised kernel that gets the layout wrong

    def forward(self, x):
        return {'features': self.bn(x)}


def test_batch_norm_gradient_in_a_permuted_layout(generator):
    model = _Features()
    bn = model.bn
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2., generator=generator)
        bn.running_var.uniform_(0.5, 2., generator=generator)
    x = torch.randn(1, 32, 2, 2, generator=generator, requires_grad=True)
    # the layout CvT's value projection sends back (torch's own backward is wrong for it)
    seed = torch.empty_strided((1, 32, 2, 2), (32, 1, 64, 32))
    seed.copy_(torch.randn(1, 32, 2, 2, generator=generator))
    with ViTEpsilon(epsilon=1e-9).context(model):
        y = model(x)['features']
        (g,) = torch.autograd.grad(y, x, seed)
    scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()[None, :, None, None]
    assert_rel_close(g, seed * scale, 1e-6)
