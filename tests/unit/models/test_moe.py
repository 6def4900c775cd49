"""Mixture-of-experts blocks (transformers 5: one experts module with 3-D ``gate_up_proj``/``down_proj``
parameters, dispatched through ``ALL_EXPERTS_FUNCTIONS``; a router holding a bare weight).

lxt_ext holds the routing weights constant (the router gets no relevance) and runs each expert's
projections and gated product under the composite's rules. tests/oracle/test_coverage_vs_lxt.py compares
Mixtral and Qwen3-MoE with LXT 2.1's rules on transformers 4.57's experts; tests/unit/models/test_model_coverage.py
checks conservation, removal and the audit. Here, without the oracle environment:

- a block whose experts are all the same gated MLP, with routing weights that sum to one per token,
  is that MLP: its relevance is the relevance of the dense model of the same family with that MLP
  (Qwen3-MoE -> Qwen3, Mixtral -> Mistral), though tokens are routed to different experts. A routing
  weight dropped or a token's output sent to the wrong place would differ (a router given relevance
  would not: with identical experts its gradient cancels; test_coverage_vs_lxt.py and the conservation
  of tests/unit/models/test_model_coverage.py see that, and here the router's outputs carry no grad);
- every experts implementation of transformers (eager, batched_mm, grouped_mm) gives the same
  relevance, and its own forward again after removal;
- what the rule cannot take is refused by name (GPT-OSS's clamped, interleaved gate).
"""
import pytest
import torch

from conftest import require_module

transformers = require_module('transformers')

from lxt_ext.attribution import Explainer  # noqa: E402
from lxt_ext.composites import LanguageTransformer  # noqa: E402

VOCAB, TOKENS, INTERMEDIATE = 64, 10, 48
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, initializer_range=0.2, rms_norm_eps=1e-6)
FAMILIES = {
    'qwen3_moe': (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM, dict(
        head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=INTERMEDIATE, norm_topk_prob=True),
        transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(head_dim=16)),
    'mixtral': (transformers.MixtralConfig, transformers.MixtralForCausalLM, dict(
        num_local_experts=4, num_experts_per_tok=2, intermediate_size=INTERMEDIATE),
        transformers.MistralConfig, transformers.MistralForCausalLM, dict(
            rope_parameters={'rope_type': 'default', 'rope_theta': 1e6}, sliding_window=None)),  # Mixtral's
}


def logits(model, x):
    return model(inputs_embeds=x).logits


def moe(name):
    config, model, kwargs = FAMILIES[name][:3]
    torch.manual_seed(0)
    model = model(config(**COMMON, **kwargs)).eval()
    x = model.get_input_embeddings()(torch.randint(0, VOCAB, (2, TOKENS))).detach()
    return model, x


def identical_experts_and_dense(name):
    """The MoE model with every expert a copy of expert 0, and the dense model with that MLP."""
    model, x = moe(name)
    dense_config, dense_model, dense_kwargs = FAMILIES[name][3:]
    torch.manual_seed(0)
    dense = dense_model(dense_config(**COMMON, **dense_kwargs, intermediate_size=INTERMEDIATE)).eval()
    state = {}
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if key.endswith('experts.gate_up_proj'):
                value[:] = value[0].clone()
                gate, up = value[0].chunk(2, dim=0)
                state[key.replace('experts.gate_up_proj', 'gate_proj.weight')] = gate
                state[key.replace('experts.gate_up_proj', 'up_proj.weight')] = up
            elif key.endswith('experts.down_proj'):
                value[:] = value[0].clone()
                state[key.replace('experts.down_proj', 'down_proj.weight')] = value[0]
            elif not key.endswith('mlp.gate.weight'):
                state[key] = value
    dense.load_state_dict(state)
    return model, dense, x


@pytest.mark.parametrize('mode', ['attnlrp', 'cp'])
@pytest.mark.parametrize('name', FAMILIES)
def test_identical_experts_explain_as_the_dense_mlp(name, mode):
    model, dense, x = identical_experts_and_dense(name)
    results = {}
    for key, m in (('moe', model), ('dense', dense)):
        with Explainer(m, LanguageTransformer(attention=mode), forward=logits) as attributor:
            results[key] = attributor(x, 5)
    torch.testing.assert_close(results['moe'][0], results['dense'][0], rtol=1e-5, atol=1e-5)
    # the tokens really go to different experts
    with torch.no_grad():
        _, _, chosen = model.model.layers[0].mlp.gate(model.model.layers[0].input_layernorm(x).view(-1, 64))
    assert chosen.unique().numel() > 2
    # float32 rounding: the MoE sums two routing-weighted copies (measured <= 3e-5 of the largest relevance)
    relevance, expected = results['moe'][1], results['dense'][1]
    error = (relevance - expected).abs().max() / expected.abs().max()
    assert error <= 1e-4, f'{name} {mode}: max |difference| = {error:.2e} x max |dense relevance|'


@pytest.mark.parametrize('name', FAMILIES)
def test_every_experts_implementation_gives_the_same_relevance(name):
    model, x = moe(name)
    results = {}
    for implementation in ('eager', 'batched_mm', 'grouped_mm'):
        model.set_experts_implementation(implementation)
        with torch.no_grad():
            plain = logits(model, x)
        with Explainer(model, LanguageTransformer(), forward=logits) as attributor:
            output, results[implementation] = attributor(x, 5)[:2]
        torch.testing.assert_close(output, plain, rtol=1e-5, atol=1e-5)
        # after removal the model runs transformers' implementation again
        assert model.model.layers[0].mlp.experts.config._experts_implementation == implementation
        torch.testing.assert_close(logits(model, x), plain, rtol=0, atol=0)
    for implementation in ('batched_mm', 'grouped_mm'):
        torch.testing.assert_close(results[implementation], results['eager'], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('name', FAMILIES)
def test_the_router_runs_without_grad(name):
    model, x = moe(name)
    routers = [layer.mlp.gate for layer in model.model.layers]
    seen = []
    handles = [router.register_forward_hook(lambda module, args, output: seen.append(output)) for router in routers]
    try:
        with Explainer(model, LanguageTransformer(), forward=logits) as attributor:
            attributor(x, 5)
    finally:
        for handle in handles:
            handle.remove()
    assert len(seen) == len(routers)
    assert not any(t.requires_grad for output in seen for t in output)


def test_a_custom_gate_is_refused_by_name():
    """GPT-OSS clamps its gate and up projections and interleaves them: no rule here covers that."""
    torch.manual_seed(0)
    config = transformers.GptOssConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                       num_local_experts=4, num_experts_per_tok=2)
    model = transformers.GptOssForCausalLM(config).eval()
    with pytest.raises(NotImplementedError, match='GptOssExperts.*custom gate'):
        LanguageTransformer().register(model)
    assert not any('_lxt_ext_rule' in vars(module) or type(getattr(module, 'config', None)).__name__ == 'ConfigView'
                   for module in model.modules())
