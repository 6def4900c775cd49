"""Shared helpers for the oracle tests (lxt_ext rules/composites vs zennit's own, LXT 2.1), the
missing-oracle/dependency policy (``require``) and the hypothesis profiles."""
import importlib
import importlib.util
import os
import sys

import pytest
import torch
from hypothesis import settings
from zennit.composites import LayerMapComposite

import lxt_ext.rules
import lxt_oracle
import zennit.rules

IN_CI = os.environ.get('CI') == 'true'

# The benchmark scripts and their helpers (``harness``) live in python/benchmarks/, outside the package (the
# wheel does not ship them); the benchmark suites and the memory measurements of the tests import them from
# there, as a script run from that folder does.
# the checkout's root (tests/ mirrors the package below it: unit/<subpackage>, oracle, system, benchmarks, cpp)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, 'python', 'benchmarks')
if BENCHMARKS not in sys.path:
    sys.path.insert(0, BENCHMARKS)

# hypothesis: in CI a fixed, derandomized search (a failure reproduces on rerun and on any machine);
# per-test @settings (max_examples, deadline) still apply on top of the loaded profile.
settings.register_profile('ci', derandomize=True, database=None, print_blob=True)
if IN_CI:
    settings.load_profile('ci')


def require(condition, reason):
    """A test's oracle or pinned dependency must be there: without it the test is skipped locally
    and fails in CI (``CI=true``), never passes green by accident. Usable at module level."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f'{reason} (CI=true: a missing oracle or pinned dependency is a failure, not a skip)',
                    pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def require_module(name):
    """``import name`` under the ``require`` policy. Only a module that is not installed at all is a
    skip (locally); an installed but broken one raises its import error (unlike ``importorskip``)."""
    require(importlib.util.find_spec(name) is not None, f'{name} is not installed')
    return importlib.import_module(name)


def require_oracle():
    """The LXT 2.1 oracle environment (``.oracle``, or ``LXT_ORACLE_PATH``) under the ``require`` policy."""
    require(lxt_oracle.available(), f'LXT 2.1 oracle environment missing at {lxt_oracle.ORACLE_PATH}')
    return lxt_oracle


@pytest.fixture
def oracle():
    """``lxt_oracle`` once its environment is known to be there (``require_oracle``)."""
    return require_oracle()

RULE_NAMES = ('Epsilon', 'Gamma', 'ZPlus', 'AlphaBeta')


def rule_pair(name, **kwargs):
    """``(lxt_ext rule, zennit rule)`` of the same name built with the same arguments."""
    return getattr(lxt_ext.rules, name)(**kwargs), getattr(zennit.rules, name)(**kwargs)


def relevance(module, x, grad_output, composite=None, forward_kwargs=None):
    """``torch.autograd.grad(module(x), x, grad_output)`` with ``composite`` registered on ``module``
    (default: none). ``grad_output`` may be a callable ``output -> grad_output``."""
    x = x.detach().clone().requires_grad_()
    forward_kwargs = forward_kwargs or {}
    if composite is None:
        y = module(x, **forward_kwargs)
        g = grad_output(y) if callable(grad_output) else grad_output
        return torch.autograd.grad(y, x, g)[0]
    with composite.context(module) as modified:
        y = modified(x, **forward_kwargs)
        g = grad_output(y) if callable(grad_output) else grad_output
        (grad,) = torch.autograd.grad(y, x, g)
    return grad


def layer_relevance(module, x, grad_output, rule, forward_kwargs=None):
    """Relevance of ``x`` with ``rule`` mapped onto ``module``'s type by a ``LayerMapComposite``."""
    composite = LayerMapComposite(layer_map=[(type(module), rule)])
    return relevance(module, x, grad_output, composite, forward_kwargs)


def assert_rel_close(actual, expected, rtol):
    """``max|actual - expected| <= rtol * max|expected|`` (and same shape, all finite)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert torch.isfinite(expected).all(), 'oracle produced non-finite values'
    assert torch.isfinite(actual).all(), 'non-finite relevance'
    scale = expected.abs().max().item()
    assert scale > 0, 'oracle relevance is all zero: the test would be vacuous'
    err = (actual - expected).abs().max().item()
    assert err <= rtol * scale, f'max|diff| = {err:.3e} > {rtol:.0e} * max|ref| = {rtol * scale:.3e}'


def signed_input(shape, dtype, generator, zero_fraction=0.25):
    """Normal input with negative values and a fraction of exact zeros."""
    x = torch.randn(shape, dtype=dtype, generator=generator)
    x[torch.rand(shape, generator=generator) < zero_fraction] = 0.
    return x


def relu_input(shape, dtype, generator):
    """A post-ReLU input: non-negative with (about half) exact zeros."""
    return torch.randn(shape, dtype=dtype, generator=generator).clamp(min=0)


def randomize_biases(module, generator, std=0.1):
    """Give every bias of ``module`` (and its children) random nonzero values."""
    with torch.no_grad():
        for sub in module.modules():
            bias = getattr(sub, 'bias', None)
            if isinstance(bias, torch.Tensor):
                bias.copy_(torch.randn(bias.shape, generator=generator, dtype=bias.dtype) * std)
    return module


def randomize_batch_norms(model, seed):
    """Random biases and BatchNorm statistics and scales (a fresh model's BatchNorms are identities),
    ``model`` in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    randomize_biases(model, generator, std=0.1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                shape = module.running_mean.shape
                module.running_mean.copy_(torch.randn(shape, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(shape, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(shape, generator=generator) + 0.5)
    return model.eval()


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(0)


class EmbedsToLogits(torch.nn.Module):
    """A causal LM as ``inputs_embeds -> logits`` (zennit's attributors call ``model(input)``)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, x):
        return self.lm(inputs_embeds=x).logits

