"""pytest-benchmark: plain forward+backward and lxt_ext's LanguageTransformer (AttnLRP) on the LLaMA-style
decoder of python/benchmarks/benchmark_language.py (8 layers, width 512, GQA 8/2, the top logit at the last token).

    .venv/bin/python -m pytest tests/benchmarks/test_bench_language.py --benchmark-enable

Measured: 2,048 tokens on 2 threads. With the project's default (--benchmark-disable) each case runs once
at 32 tokens as a smoke test. LXT 2.1 needs its own environment (transformers 4.x), so the comparison
with it comes from python/benchmarks/benchmark_language.py.
"""
import pytest
import torch

from conftest import require_module

require_module('transformers')
import benchmark_language  # noqa: E402  (python/benchmarks/, on sys.path from tests/conftest.py)


@pytest.mark.parametrize('method', ['plain', 'lxt_ext'])
def test_llama_style_decoder(benchmark, method):
    tokens = 32 if benchmark.disabled else 2048
    run = benchmark_language.attribution(method, tokens)
    result = benchmark.pedantic(run, rounds=3, warmup_rounds=1) if not benchmark.disabled else benchmark(run)
    assert result.shape == (1, tokens, 512) and torch.isfinite(result).all() and result.abs().sum() > 0
