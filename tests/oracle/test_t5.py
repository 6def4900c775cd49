"""T5 and Flan-T5 (encoder-decoder) under lxt_ext, explained for a decoder logit w.r.t. the encoder and the
decoder input embeddings.

T5's attention adds a relative position bias to the scores (a function of the positions only, off the
relevance path): lxt_ext passes it to its fused attention op as an additive mask. T5's layer norm is an
RMS norm without mean or bias (identity rule on the normalisation); Flan-T5's feed-forward is a
gated GELU, ``wo(gelu(wi_0 x) * wi_1 x)`` (the gated-MLP rule).

Oracle: LXT 2.1's published rules on transformers 4.57's own T5 (LXT 2.1 has no T5 map): its
``rms_norm_forward`` on ``T5LayerNorm``, its ``gated_mlp_forward`` / ``cp_gated_mlp_forward`` on
``T5DenseGatedActDense`` (wi_0 the gate, wi_1 up, wo down), ``dropout_forward``, and its attention
wrapper's gradient scaling (AttnLRP: query and key gradients / 4, value / 2; CP-LRP: query and key
stopped), applied by forward hooks on the q, k, v projections because 4.57's T5 computes attention in
its own forward. Linear layers keep the plain gradient there (epsilon 0): lxt_ext runs with epsilon
1e-12. The encoder input is padded in one row.
"""
import pytest
import torch

from conftest import require_module, require_oracle

transformers = require_module('transformers')

from lxt_ext.attribution import Explainer  # noqa: E402
from lxt_ext.composites import LanguageTransformer  # noqa: E402

TOLERANCE = 3e-4  # max |difference| <= TOLERANCE * max |LXT relevance|; measured <= 1.2e-4 on ATen's attention path, 2e-5 on the own kernels (float32 rounding)
ENCODER, DECODER, VOCAB = 10, 6, 64
KWARGS = {
    't5': dict(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_decoder_layers=2, num_heads=4,
               relative_attention_num_buckets=8, relative_attention_max_distance=16, initializer_factor=4.0,
               feed_forward_proj='relu', decoder_start_token_id=0),
}
KWARGS['flan_t5'] = dict(KWARGS['t5'], feed_forward_proj='gated-gelu', tie_word_embeddings=False)
CASES = [(name, mode) for name in KWARGS for mode in ('attnlrp', 'cp')]


def make(name):
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(**KWARGS[name])).eval()
    embed = model.get_input_embeddings()
    x = torch.cat([embed(torch.randint(0, VOCAB, (2, ENCODER))), embed(torch.randint(0, VOCAB, (2, DECODER)))],
                  dim=1).detach()
    mask = torch.ones(2, ENCODER, dtype=torch.long)
    mask[1, -3:] = 0  # the second encoder input is padded
    return model, x, mask


def forward_with(mask):
    def forward(model, x):
        return model(inputs_embeds=x[:, :ENCODER], attention_mask=mask, decoder_inputs_embeds=x[:, ENCODER:]).logits
    return forward


def seed(logits):
    seed = torch.zeros_like(logits)
    seed[:, -1, 5] = 1
    return seed


def explain(name, mode, epsilon=1e-12):
    model, x, mask = make(name)
    with Explainer(model, LanguageTransformer(attention=mode, epsilon=epsilon),
                   forward=forward_with(mask)) as attributor:
        # LXT backpropagates the mask as a gradient; seeded as relevance that is logits * mask
        return attributor(x, lambda logits: logits * seed(logits))[:2]


ORACLE = '''
from functools import partial
import transformers
from torch.nn import Dropout
from transformers.models.t5 import modeling_t5
from lxt.efficient.patches import (patch_method, rms_norm_forward, gated_mlp_forward, cp_gated_mlp_forward,
                                   dropout_forward)
from lxt.efficient.rules import divide_gradient, stop_gradient


class Renamed:
    def __init__(self, mlp):
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = mlp.wi_0, mlp.wi_1, mlp.wo, mlp.act


for key, (mode, kwargs, state, x, mask, seed) in inputs.items():
    mlp = gated_mlp_forward if mode == 'attnlrp' else cp_gated_mlp_forward
    patch_method(lambda self, x, mlp=mlp: mlp(Renamed(self), x), modeling_t5.T5DenseGatedActDense)
    patch_method(rms_norm_forward, modeling_t5.T5LayerNorm)
    patch_method(dropout_forward, Dropout)
    config = transformers.T5Config(**kwargs)
    config._attn_implementation = 'eager'
    model = modeling_t5.T5ForConditionalGeneration(config).eval()
    model.load_state_dict(state)
    for module in model.modules():
        if isinstance(module, modeling_t5.T5Attention):
            if mode == 'attnlrp':  # LXT's wrap_attention_forward: q, k gradients / 4, v / 2
                scaling = {module.q: 4, module.k: 4, module.v: 2}
                for linear, factor in scaling.items():
                    linear.register_forward_hook(lambda m, args, out, factor=factor: divide_gradient(out, factor))
            else:  # cp_wrap_attention_forward: no gradient through q and k
                for linear in (module.q, module.k):
                    linear.register_forward_hook(lambda m, args, out: stop_gradient(out))
    x = x.clone().requires_grad_()
    logits = model(inputs_embeds=x[:, :10], attention_mask=mask, decoder_inputs_embeds=x[:, 10:]).logits
    logits.backward(seed)
    outputs[key] = {'logits': logits.detach(), 'relevance': (x * x.grad).detach()}
'''


@pytest.fixture(scope='module')
def lxt_results():
    oracle = require_oracle()
    results = {}
    for mode in ('attnlrp', 'cp'):  # one process per mode: LXT's patches are class-wide
        inputs = {}
        for name in KWARGS:
            model, x, mask = make(name)
            with torch.no_grad():
                logits = forward_with(mask)(model, x)
            inputs[name] = (mode, KWARGS[name], model.state_dict(), x, mask, seed(logits))
        for name, result in oracle.run(ORACLE, **inputs).items():
            results[name, mode] = result
    return results


@pytest.mark.parametrize('name,mode', CASES)
def test_relevance_matches_lxt_rules_on_transformers_4(name, mode, lxt_results):
    expected = lxt_results[name, mode]
    logits, relevance = explain(name, mode)
    # the two transformers versions compute T5 in a different order (and GELU-tanh by another formula):
    # float32 rounding, measured up to 3e-5 of the largest logit
    assert (logits - expected['logits']).abs().max() <= 1e-4 * expected['logits'].abs().max()
    reference = expected['relevance']
    assert reference[:, :ENCODER].abs().max() > 0 and reference[:, ENCODER:].abs().max() > 0
    error = (relevance - reference).abs().max() / reference.abs().max()
    assert error <= TOLERANCE, f'{name} {mode}: max |difference| = {error:.2e} x max |LXT relevance|'


@pytest.mark.parametrize('name', KWARGS)
def test_padding_and_position_bias(name):
    """With the composite registered the model computes what it computes without (bias and padding
    mask in the fused op's additive mask), and padded encoder positions get no relevance."""
    model, x, mask = make(name)
    with torch.no_grad():
        plain = forward_with(mask)(model, x)
    logits, relevance = explain(name, 'attnlrp')
    torch.testing.assert_close(logits, plain, rtol=1e-4, atol=1e-5)
    assert torch.count_nonzero(relevance[1, ENCODER - 3:ENCODER]) == 0
    assert relevance[0, ENCODER - 3:ENCODER].abs().sum() > 0
