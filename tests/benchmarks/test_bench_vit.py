"""pytest-benchmark: plain forward+backward, lxt_ext's ViTEpsilon and ViTGamma on torchvision vit_b_16.

    .venv/bin/python -m pytest tests/benchmarks/test_bench_vit.py --benchmark-enable

Measured: batch 4 at 224x224 on 2 threads. With the project's default (--benchmark-disable) each case
runs once on a small torchvision ViT as a smoke test. LXT 2.1 needs its own environment, so its
figures come from python/benchmarks/benchmark_vit.py.
"""
import pytest
import torch

from harness.models import attribution, plain, vit
from lxt_ext.composites import ViTEpsilon, ViTGamma

COMPOSITES = {'lxt_ext_epsilon': ViTEpsilon, 'lxt_ext_gamma': ViTGamma}


@pytest.mark.parametrize('method', ['plain', 'lxt_ext_epsilon', 'lxt_ext_gamma'])
def test_vit_b_16(benchmark, method):
    torch.set_num_threads(2)
    model = vit(small=benchmark.disabled)
    size, batch = (32, 1) if benchmark.disabled else (224, 4)
    x = torch.randn(batch, 3, size, size)
    target = torch.eye(1000)[:batch]
    run = plain(model, x, target) if method == 'plain' else attribution(model, COMPOSITES[method](), x, target)

    result = benchmark.pedantic(run, rounds=3, warmup_rounds=1) if not benchmark.disabled else benchmark(run)
    assert torch.isfinite(result).all() and result.abs().sum() > 0
