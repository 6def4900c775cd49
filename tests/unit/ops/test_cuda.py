"""The CUDA kernels against the CPU kernels (skipped without a GPU)."""
import pytest
import torch
from zennit.composites import LayerMapComposite
from zennit.types import Convolution

import lxt_ext
from lxt_ext.rules import AlphaBeta, Epsilon, Gamma, ZPlus

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA device')


def attribute(model, rule_map, x, upstream):
    x = x.clone().requires_grad_()
    with LayerMapComposite(rule_map).context(model):
        y = model(x)
        grad, = torch.autograd.grad(y, x, upstream)
    return grad


@needs_gpu
@pytest.mark.parametrize('dtype, tol', [(torch.float32, 1e-4), (torch.bfloat16, 5e-2), (torch.float16, 1e-2)])
@pytest.mark.parametrize('rule', [Epsilon(), Gamma(), ZPlus(), AlphaBeta()], ids=lambda r: type(r).__name__)
@pytest.mark.parametrize('convention', ['explicit', 'gradient_x_input'])
@pytest.mark.parametrize('relu', [False, True])
def test_cuda_matches_cpu(dtype, tol, rule, convention, relu):
    assert lxt_ext.cuda_built(), 'a GPU is present but lxt_ext was built without its CUDA kernels'
    rule = type(rule)(convention=convention)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1, groups=1), torch.nn.Conv2d(8, 6, 3, stride=2, groups=2),
                                torch.nn.Flatten(), torch.nn.Linear(6 * 7 * 7, 5))
    x = torch.randn(2, 3, 16, 16)
    if relu:
        x = x.relu()
    upstream = torch.randn(2, 5)
    rule_map = [(Convolution, rule), (torch.nn.Linear, Epsilon(convention=convention))]
    cpu = attribute(model.double(), rule_map, x.double(), upstream.double())
    gpu = attribute(model.to('cuda', dtype), rule_map, x.to('cuda', dtype), upstream.to('cuda', dtype))
    assert gpu.dtype == dtype
    assert ((gpu.double().cpu() - cpu).abs().max() / cpu.abs().max()) < tol


def test_cuda_built_is_reported():
    assert isinstance(lxt_ext.cuda_built(), bool)


# What a first GPU run usually finds (issue 11, item 3), for the rule kernels. The oracle is the epsilon
# rule written out with plain torch ops: R_in = x * W^T (R / stab(W x + b)), stab(z) = z + eps (sign(z) + [z == 0]).
# The layers get a bias of 10, so that no output is near 0, where the ratio would magnify rounding.


def linear(inputs, outputs, dtype=torch.float32):
    layer = torch.nn.Linear(inputs, outputs).cuda().to(dtype)
    torch.nn.init.constant_(layer.bias, 10.0)
    return layer

def epsilon_reference(x, weight, bias, relevance, eps=1e-6):
    x, weight, bias, relevance = (t.double() for t in (x, weight, bias, relevance))
    z = x @ weight.t() + bias
    return x * ((relevance / (z + eps * (z.sign() + (z == 0)))) @ weight)


def epsilon_relevance(layer, x, relevance):
    """lxt_ext's fused Epsilon on ``layer`` (explicit convention): the relevance of ``x``."""
    x = x.detach().requires_grad_()
    with LayerMapComposite([(torch.nn.Linear, Epsilon())]).context(layer):
        grad, = torch.autograd.grad(layer(x), x, relevance)
    return grad


def assert_close_to(actual, expected, rtol):
    err = (actual.double().cpu() - expected.double().cpu()).abs().max().item() if expected.numel() else 0.0
    assert err <= rtol * max(expected.abs().max().item() if expected.numel() else 0.0, 1e-30), err


@needs_gpu
def test_cuda_rule_on_non_contiguous_inputs():
    torch.manual_seed(0)
    layer = linear(24, 16)
    x = torch.randn(16, 8, 24, device='cuda').transpose(0, 1)          # (8, 16, 24), not contiguous
    relevance = torch.randn(1, 16, 16, device='cuda').expand(8, 16, 16)  # stride 0 along the batch
    assert not x.is_contiguous() and not relevance.is_contiguous()
    expected = epsilon_reference(x, layer.weight, layer.bias, relevance)
    assert_close_to(epsilon_relevance(layer, x, relevance), expected, 1e-6)


@needs_gpu
def test_cuda_rule_on_zero_sized_batches():
    layer = linear(24, 16)
    x = torch.randn(0, 24, device='cuda')
    out = epsilon_relevance(layer, x, torch.randn(0, 16, device='cuda'))
    assert out.shape == (0, 24) and out.is_cuda


@needs_gpu
def test_cuda_rule_on_the_current_stream():
    torch.manual_seed(1)
    layer = linear(256, 512)
    x, relevance = torch.randn(4096, 256), torch.randn(4096, 512)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        result = epsilon_relevance(layer, x.cuda(), relevance.cuda()).cpu()
    assert_close_to(result, epsilon_reference(x, layer.weight.cpu(), layer.bias.cpu(), relevance), 1e-5)


@needs_gpu
def test_cuda_rule_beyond_one_grid():
    """151M output elements: more than the element-wise kernels' grid (65535 * 8 blocks of 256 threads)
    covers in one pass, so the grid-stride loops run twice; int64 offsets throughout."""
    torch.manual_seed(2)
    layer = linear(64, 4096)
    x = torch.randn(36864, 64, device='cuda')
    relevance = torch.randn(36864, 4096, device='cuda')
    assert relevance.numel() > 65535 * 8 * 256
    result = epsilon_relevance(layer, x, relevance)
    assert_close_to(result, epsilon_reference(x, layer.weight, layer.bias, relevance), 1e-5)


@needs_gpu
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_cuda_rule_half_types_accumulate_in_float32(dtype):
    torch.manual_seed(3)
    layer = linear(2048, 64, dtype)
    x, relevance = torch.randn(32, 2048, device='cuda', dtype=dtype), torch.randn(32, 64, device='cuda', dtype=dtype)
    result = epsilon_relevance(layer, x, relevance)
    assert result.dtype == dtype
    assert_close_to(result, epsilon_reference(x, layer.weight, layer.bias, relevance), 5e-2)


@needs_gpu
@pytest.mark.parametrize('dtype, tol', [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_cuda_identity_backward_matches_cpu(dtype, tol):
    """The identity rule's op on CUDA equals the CPU kernel, also non-contiguous and beyond one grid."""
    torch.manual_seed(4)
    for shape in ((3, 5, 7), (4, 65535 * 8 * 256 // 4 + 3)):
        h, x, g = (torch.randn(shape, dtype=dtype) for _ in range(3))
        expected = torch.ops.lxt_ext.identity_backward(h, x, g, 1e-6)
        got = torch.ops.lxt_ext.identity_backward(*(t.cuda().mT.contiguous().mT for t in (h, x, g)), 1e-6)
        assert got.dtype == dtype and got.is_contiguous()
        assert ((got.cpu().float() - expected.float()).abs() / expected.float().abs().clamp(min=1e-6)).max() < tol
