"""Hugging Face language transformers under lxt_ext against LXT 2.1 (the oracle).

Tiny random-weight LLaMA (grouped-query attention), Qwen2 (projection biases), GPT-2 (Conv1D
layers, LayerNorm) and BERT (padding mask) configs. lxt_ext runs on the installed transformers
5.x with its default attention implementation; LXT 2.1 runs ``monkey_patch`` of the same modeling
module in its own environment (transformers 4.57.6, eager attention, see tests/lxt_oracle.py) on
the same weights and input embeddings. Relevance is w.r.t. the input embeddings: x * grad.
"""
import pytest
import torch

from conftest import require_module, require_oracle

transformers = require_module('transformers')  # a skip only where it is not installed (locally)

from lxt_ext.attribution import Explainer  # noqa: E402
from lxt_ext.composites import LanguageTransformer  # noqa: E402

TOLERANCE = 1e-3  # max |difference| <= TOLERANCE * max |LXT relevance|
BATCH, TOKENS = 2, 12

CONFIGS = {
    'llama': ('LlamaConfig', 'LlamaForCausalLM', 'modeling_llama', dict(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2)),
    'qwen2': ('Qwen2Config', 'Qwen2ForCausalLM', 'modeling_qwen2', dict(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2)),
    'gpt2': ('GPT2Config', 'GPT2LMHeadModel', 'modeling_gpt2', dict(
        vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=64, initializer_range=0.2,
        bos_token_id=0, eos_token_id=0)),
    'bert': ('BertConfig', 'BertForSequenceClassification', 'modeling_bert', dict(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, num_labels=3, initializer_range=0.2)),
}
# LXT 2.1 ships CP-LRP maps for the decoder models only.
CASES = [(name, 'attnlrp') for name in CONFIGS] + [(name, 'cp') for name in ('llama', 'qwen2', 'gpt2')]


def make(name):
    """Random-weight model (transformers 5.x), input embeddings, attention mask and target."""
    config_name, model_name, _, kwargs = CONFIGS[name]
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(getattr(transformers, config_name)(**kwargs)).eval()
    ids = torch.randint(0, kwargs['vocab_size'], (BATCH, TOKENS))
    embeds = model.get_input_embeddings()(ids).detach()
    mask = torch.ones(BATCH, TOKENS, dtype=torch.long)
    if name == 'bert':
        mask[1, -3:] = 0  # right padding of the second sequence
    return model, embeds, mask


def target_seed(name, logits):
    seed = torch.zeros_like(logits)
    if logits.dim() == 3:
        seed[:, -1, 5] = 1
    else:
        seed[:, 1] = 1
    return seed


ORACLE = '''
import importlib, transformers, lxt.efficient
from lxt.efficient import monkey_patch
for name, (config_name, model_name, modeling, mode, kwargs, state, embeds, mask, seed) in inputs.items():
    module = importlib.import_module(f'transformers.models.{name}.{modeling}')
    patch_map = None if mode == 'attnlrp' else importlib.import_module(f'lxt.efficient.models.{name}').cp_LRP
    monkey_patch(module, patch_map)
    config = getattr(transformers, config_name)(**kwargs)
    config._attn_implementation = 'eager'
    model = getattr(module, model_name)(config).eval()
    model.load_state_dict(state)
    x = embeds.clone().requires_grad_()
    logits = model(inputs_embeds=x, attention_mask=mask).logits
    logits.backward(seed)
    outputs[name] = {'logits': logits.detach(), 'relevance': (x * x.grad).detach()}
'''


@pytest.fixture(scope='module')
def lxt_results():
    """LXT's relevance per case; one oracle process per mode (LXT patches modules for good)."""
    oracle = require_oracle()  # missing .oracle: a skip locally, a failure in CI
    results = {}
    for mode in ('attnlrp', 'cp'):
        inputs = {}
        for name, case_mode in CASES:
            if case_mode != mode:
                continue
            config_name, model_name, modeling, kwargs = CONFIGS[name]
            model, embeds, mask = make(name)
            with torch.no_grad():
                logits = model(inputs_embeds=embeds, attention_mask=mask).logits
            inputs[name] = (config_name, model_name, modeling, mode, kwargs, model.state_dict(), embeds, mask,
                            target_seed(name, logits))
        for name, result in oracle.run(ORACLE, **inputs).items():
            results[name, mode] = result
    return results


def explain(name, mode, **composite_kwargs):
    model, embeds, mask = make(name)
    composite = LanguageTransformer(attention=mode, **composite_kwargs)
    forward = lambda model, x: model(inputs_embeds=x, attention_mask=mask).logits  # noqa: E731
    with Explainer(model, composite, forward=forward) as attributor:
        # LXT backpropagates the mask as a gradient; seeded as relevance that is logits * mask
        logits, relevance = attributor(embeds, lambda logits: logits * target_seed(name, logits))[:2]
    return logits, relevance


@pytest.mark.parametrize('name,mode', CASES)
def test_relevance_matches_lxt(name, mode, lxt_results):
    expected = lxt_results[name, mode]
    logits, relevance = explain(name, mode)
    torch.testing.assert_close(logits, expected['logits'], rtol=1e-4, atol=1e-5)
    reference = expected['relevance']
    assert reference.abs().max() > 0
    error = (relevance - reference).abs().max() / reference.abs().max()
    assert error <= TOLERANCE, f'{name} {mode}: max |difference| = {error:.2e} x max |LXT relevance|'
