"""pytest-benchmark: plain forward+backward, lxt_ext's ViTEpsilon and ViTGamma on torchvision vit_b_16.

    .venv/bin/python -m pytest tests/benchmarks/test_bench_vit.py --benchmark-enable

Measured: batch 4 at 224x224 on 2 threads. With the project's default (--benchmark-disable) each case
runs once on a small torchvision ViT as a smoke test. LXT 2.1 needs its own environment, so its
figures come from python/benchmark_vit.py.
"""
import pytest
import torch
import torchvision
from zennit.attribution import Gradient

from lxt_ext.transformer_composites import ViTEpsilon, ViTGamma

COMPOSITES = {'lxt_ext_epsilon': ViTEpsilon, 'lxt_ext_gamma': ViTGamma}


@pytest.mark.parametrize('method', ['plain', 'lxt_ext_epsilon', 'lxt_ext_gamma'])
def test_vit_b_16(benchmark, method):
    torch.set_num_threads(2)
    torch.manual_seed(0)
    if benchmark.disabled:
        model, size, batch = torchvision.models.VisionTransformer(32, 8, 2, 4, 32, 64), 32, 1
    else:
        model, size, batch = torchvision.models.vit_b_16(), 224, 4
    model.eval()
    torch.nn.init.normal_(model.heads.head.weight, std=0.03)  # torchvision zero-initialises the head
    x = torch.randn(batch, 3, size, size)
    target = torch.eye(1000)[:batch]

    if method == 'plain':
        def run():
            xg = x.clone().requires_grad_()
            return torch.autograd.grad(model(xg), xg, target)[0]
    else:
        composite = COMPOSITES[method]()

        def run():
            with Gradient(model, composite) as attributor:
                return attributor(x, target)[1]

    result = benchmark.pedantic(run, rounds=3, warmup_rounds=1) if not benchmark.disabled else benchmark(run)
    assert torch.isfinite(result).all() and result.abs().sum() > 0
