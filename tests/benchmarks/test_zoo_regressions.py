"""Model types of the zoo sweep (python/benchmarks/zoo_sweep.py) that once leaked, changed the output or crashed,
each explained as the sweep explains it (tiny config, random weights, offsets zeroed) and held to its verdict:
exact, i.e. the forward unchanged and the relevance summing to the explained logit within 1e-3, and AttnLRP
running on it as well. Oracle: conservation (CP-LRP with epsilon -> 0 conserves once the additive constants are
zero)."""
import pytest
import torch

pytest.importorskip('transformers')
pytest.importorskip('timm')
import zoo_sweep  # noqa: E402  (python/benchmarks is on the path: tests/conftest.py)

CASES = [
    # (zoo, type, what it once did)
    ('causal_lm', 'dbrx', 'routing weights over their norm: a gate still'),
    ('causal_lm', 'gemma3n_text', "AltUp's coefficients: a Linear layer over a tanh router, a gate"),
    ('causal_lm', 'deepseek_v32', "DeepSeek's sparse attention: the indexer's keys"),
    ('causal_lm', 'longcat_flash', 'zero experts: a sum of routing weights'),
    ('causal_lm', 'prophetnet', 'n-gram tokens: offsets'),
    ('causal_lm', 'bamba', 'a Mamba-2 mixer called with keyword arguments (AttnLRP: dt was not held constant)'),
    ('sequence_classification', 'big_bird', "GELU's tanh form written out in the head (AttnLRP: pow refused)"),
    ('timm_vit', 'convit_tiny', 'attention weights normalised by their sum (AttnLRP: the division refused)'),
    ('timm_vit', 'eca_botnext26ts_256', 'a sigmoid gate broadcast with expand_as (AttnLRP: refused)'),
    ('causal_lm', 'doge', 'a dynamic attention mask through softplus: no relevance reaches it under CP-LRP'),
    ('causal_lm', 'gemma3n', "its towers' own-forward convolutions under a composite without a fused conv rule"),
    ('seq2seq_lm', 'pegasus_x', 'sinusoidal positions computed in the forward, global tokens'),
    ('image_classification', 'bit', 'weight-standardised convolutions'),
    ('image_classification', 'cvt', "torch's batch-norm backward in a permuted layout"),
    ('timm_vit', 'naflexvit_base_patch16_gap', "an in-place add on OutputEpsilon's kept output"),
    ('timm_vit', 'vit_tiny_r_s16_p8_224', 'StdConv2dSame: padding worked out in the forward'),
    ('timm_vit', 'lowformer_b0', "ATen's CPU flash attention on a strided head dimension"),
    ('timm_vit', 'coat_lite_mini', 'class tokens that carry the output: counted'),
]


@pytest.fixture(autouse=True)
def _threads():
    threads = torch.get_num_threads()  # the sweep's explain runs torch on one thread (it is meant for a child)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize('zoo,name,why', CASES, ids=[case[1] for case in CASES])
def test_explained_exactly(zoo, name, why):
    result = zoo_sweep.explain(zoo, name, 1e-3)
    assert result['verdict'] == 'exact', (why, result)
    assert result['error'] <= 1e-3
