"""pytest-benchmark: attention forward+backward, lxt_ext's AttnLRP and CP-LRP (default rule and forced
backends) vs LXT's eager recipe vs SDPA.

    .venv/bin/python -m pytest tests/benchmarks/test_bench_attention.py --benchmark-enable \
        --benchmark-group-by=param:n

With the project's default (--benchmark-disable) each case runs once at a short length as a smoke
test. The methods are python/benchmarks/benchmark_attention.py's, from its harness.attention.
"""
import pytest
import torch

from harness import attention as benchmark_attention


@pytest.mark.parametrize('n', [1024, 4096])
@pytest.mark.parametrize('method', benchmark_attention.METHODS)
def test_attention_forward_backward(benchmark, method, n):
    torch.set_num_threads(2)
    heads = 4 if not benchmark.disabled else 1
    n = n if not benchmark.disabled else 128
    f = benchmark_attention.attention(method)
    q, k, v, g = benchmark_attention.make_inputs(n, heads)

    def run():
        benchmark_attention.run_once(f, q, k, v, g)
        return q.grad, k.grad, v.grad

    benchmark.extra_info.update(method=method, n=n, heads=heads)
    grads = benchmark.pedantic(run, rounds=3, warmup_rounds=1) if not benchmark.disabled else benchmark(run)
    if '_cp' in method:  # CP-LRP: relevance flows through V only
        assert grads[0] is None and grads[1] is None
        grads = grads[2:]
    assert all(torch.isfinite(x).all() and x.abs().sum() > 0 for x in grads)
