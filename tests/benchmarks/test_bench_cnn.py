"""pytest-benchmark: plain forward+backward, zennit's and lxt_ext's EpsilonGammaBox in one run.

    .venv/bin/python -m pytest tests/benchmarks/test_bench_cnn.py --benchmark-enable --benchmark-group-by=param:model

The case that completes a model's three methods prints the ratios (lxt_ext / plain, zennit / lxt_ext)
of the medians measured in this run and adds them to its ``extra_info`` (kept by --benchmark-json).
With the project's default (--benchmark-disable) each case runs once on a small input as a smoke test.
"""
import pytest
import torch

from harness.models import cnn, epsilon_gamma_box

METHODS = ['plain', 'zennit', 'lxt_ext']
MEDIANS = {}  # (model, method) -> median seconds in this run


@pytest.fixture(scope='module', params=['vgg16', 'resnet50'])
def model(request):
    return request.param, cnn(request.param)


def report_ratios(benchmark, name, capsys):
    """Once all three methods of ``name`` ran: their ratios, on the terminal and in ``extra_info``."""
    medians = {method: MEDIANS.get((name, method)) for method in METHODS}
    if None in medians.values():
        return
    ratios = {
        'zennit / plain': medians['zennit'] / medians['plain'],
        'lxt_ext / plain': medians['lxt_ext'] / medians['plain'],
        'speed-up vs zennit': medians['zennit'] / medians['lxt_ext'],
    }
    benchmark.extra_info.update({'medians_s': medians, 'ratios': ratios})
    with capsys.disabled():
        print(f'\n{name} medians (s) ' + ', '.join(f'{k} {v:.2f}' for k, v in medians.items())
              + ' | ' + ', '.join(f'{k} {v:.2f}' for k, v in ratios.items()))


@pytest.mark.parametrize('method', METHODS)
def test_epsilon_gamma_box(benchmark, model, method, capsys):
    name, (net, canonizer) = model
    torch.set_num_threads(2)
    size, batch = (224, 4) if not benchmark.disabled else (64, 1)
    x = torch.randn(batch, 3, size, size)
    target = torch.eye(1000)[:batch]

    run = epsilon_gamma_box(net, canonizer, x, target)[method]

    benchmark.extra_info['model'] = name
    result = benchmark.pedantic(run, rounds=3, warmup_rounds=1) if not benchmark.disabled else benchmark(run)
    assert torch.isfinite(result).all() and result.abs().sum() > 0
    if not benchmark.disabled:
        MEDIANS[name, method] = benchmark.stats.stats.median
        report_ratios(benchmark, name, capsys)
