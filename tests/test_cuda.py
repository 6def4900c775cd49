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
