"""pytest-benchmark: plain forward+backward, zennit's and lxt_ext's EpsilonGammaBox in one run.

    .venv/bin/python -m pytest tests/benchmarks --benchmark-enable --benchmark-group-by=param:model

With the project's default (--benchmark-disable) each case runs once on a small input as a smoke test.
"""
import pytest
import torch
import torchvision
from zennit.attribution import Gradient
from zennit.torchvision import ResNetCanonizer, VGGCanonizer

import lxt_ext.composites
import zennit.composites

CANONIZERS = {'vgg16': VGGCanonizer, 'resnet50': ResNetCanonizer}


@pytest.fixture(scope='module', params=['vgg16', 'resnet50'])
def model(request):
    torch.manual_seed(0)
    return request.param, getattr(torchvision.models, request.param)().eval()


@pytest.mark.parametrize('method', ['plain', 'zennit', 'lxt_ext'])
def test_epsilon_gamma_box(benchmark, model, method):
    name, net = model
    torch.set_num_threads(2)
    size, batch = (224, 4) if not benchmark.disabled else (64, 1)
    x = torch.randn(batch, 3, size, size)
    target = torch.eye(1000)[:batch]

    if method == 'plain':
        def run():
            xg = x.clone().requires_grad_()
            return torch.autograd.grad(net(xg), xg, target)[0]
    else:
        module = lxt_ext.composites if method == 'lxt_ext' else zennit.composites
        composite = module.EpsilonGammaBox(low=-3., high=3., canonizers=[CANONIZERS[name]()])

        def run():
            with Gradient(net, composite) as attributor:
                return attributor(x, target)[1]

    benchmark.extra_info['model'] = name
    result = benchmark.pedantic(run, rounds=3, warmup_rounds=1) if not benchmark.disabled else benchmark(run)
    assert torch.isfinite(result).all() and result.abs().sum() > 0
