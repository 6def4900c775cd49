"""Families lxt_ext maps by structure rather than by name (tests/unit/models/test_model_coverage.py has the named ones).

Their attention modules dispatch through transformers' attention registry; their ``*RMSNorm``,
``*LayerNorm`` and ``*MLP`` classes are recognised by a numeric check at registration (the module's
output on a random probe is LLaMA's or Gemma's RMSNorm, ``F.layer_norm``, or a gated MLP), routers by
``*TopKRouter``. For each, on a tiny random-weight config: with the composite registered the model
computes its plain output; ``lxt_ext.diagnostics.audit`` finds nothing uncovered under AttnLRP and
CP-LRP; and CP-LRP with biases (and position embeddings) zeroed conserves the explained logit within
1e-3 relative. Families computing attention or experts in their own code are covered by the operation rules;
experts with a gate no rule covers are refused by name at registration.
"""
import pytest
import torch

from conftest import require_module

transformers = require_module('transformers')

from lxt_ext.attribution import Explainer  # noqa: E402
from lxt_ext.composites import LanguageTransformer, ViTEpsilon  # noqa: E402
from lxt_ext.diagnostics import audit  # noqa: E402
from lxt_ext.errors import NotExplainableError  # noqa: E402

TARGET = 5
COMMON = dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2, head_dim=16, num_labels=8,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)
MOE = dict(num_experts=4, num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=48)
# DeepSeek-style: grouped routing (one group), the first layer dense
DEEPSEEK_MOE = dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, first_k_dense_replace=1,
                    n_group=1, topk_group=1)
VISION = dict(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=128, num_labels=8, initializer_range=0.2)

# family: (config class, model class, config overrides); vision families take pixels
TEXT = {
    # experts computed in the attention and MLP modules' own code: covered by the operation rules
    'jetmoe': ('JetMoeConfig', 'JetMoeForCausalLM', dict(MOE, kv_channels=16)),
    # attention computed in the module's own code (bmm and softmax; BLOOM's ALiBi with baddbmm; DeBERTa's
    # disentangled position terms): refused by name before the operation rules
    'gpt_neo': ('GPTNeoConfig', 'GPTNeoForCausalLM', dict(attention_types=[[['global', 'local'], 1]], window_size=4)),
    'bloom': ('BloomConfig', 'BloomForCausalLM', dict(n_layer=2, n_head=4)),
    'deberta_v2': ('DebertaV2Config', 'DebertaV2ForSequenceClassification', {}),
    'cohere': ('CohereConfig', 'CohereForCausalLM', {}),
    'olmo': ('OlmoConfig', 'OlmoForCausalLM', {}),
    'olmo2': ('Olmo2Config', 'Olmo2ForCausalLM', {}),
    'granite': ('GraniteConfig', 'GraniteForCausalLM', {}),
    'stablelm': ('StableLmConfig', 'StableLmForCausalLM', {}),
    'gpt_neox': ('GPTNeoXConfig', 'GPTNeoXForCausalLM', {}),
    'phi': ('PhiConfig', 'PhiForCausalLM', {}),
    'starcoder2': ('Starcoder2Config', 'Starcoder2ForCausalLM', {}),
    'gptj': ('GPTJConfig', 'GPTJForCausalLM', dict(n_embd=64, n_layer=2, n_head=4, n_positions=64, rotary_dim=8)),
    'gpt_bigcode': ('GPTBigCodeConfig', 'GPTBigCodeForCausalLM', dict(n_embd=64, n_layer=2, n_head=4, n_positions=64)),
    'opt': ('OPTConfig', 'OPTForCausalLM', dict(ffn_dim=96, word_embed_proj_dim=64)),
    'helium': ('HeliumConfig', 'HeliumForCausalLM', {}),
    'glm': ('GlmConfig', 'GlmForCausalLM', {}),
    'glm4': ('Glm4Config', 'Glm4ForCausalLM', {}),
    'exaone4': ('Exaone4Config', 'Exaone4ForCausalLM', dict(sliding_window=4)),
    'ministral': ('MinistralConfig', 'MinistralForCausalLM', dict(sliding_window=4)),
    'smollm3': ('SmolLM3Config', 'SmolLM3ForCausalLM', {}),
    'arcee': ('ArceeConfig', 'ArceeForCausalLM', {}),
    'seed_oss': ('SeedOssConfig', 'SeedOssForCausalLM', {}),
    'ernie4_5': ('Ernie4_5Config', 'Ernie4_5ForCausalLM', {}),
    'hunyuan_dense': ('HunYuanDenseV1Config', 'HunYuanDenseV1ForCausalLM', {}),
    'apertus': ('ApertusConfig', 'ApertusForCausalLM', {}),  # xIELU activation
    'qwen2_moe': ('Qwen2MoeConfig', 'Qwen2MoeForCausalLM', dict(MOE, shared_expert_intermediate_size=48)),
    'olmoe': ('OlmoeConfig', 'OlmoeForCausalLM', MOE),
    'granitemoe': ('GraniteMoeConfig', 'GraniteMoeForCausalLM', MOE),
    'glm4_moe': ('Glm4MoeConfig', 'Glm4MoeForCausalLM', dict(DEEPSEEK_MOE, n_shared_experts=1)),
    'dots1': ('Dots1Config', 'Dots1ForCausalLM', dict(DEEPSEEK_MOE, n_shared_experts=1)),
    'hunyuan_moe': ('HunYuanMoEV1Config', 'HunYuanMoEV1ForCausalLM', dict(MOE, moe_topk=2)),
    'flex_olmo': ('FlexOlmoConfig', 'FlexOlmoForCausalLM', MOE),
    'minimax': ('MiniMaxConfig', 'MiniMaxForCausalLM', dict(MOE, layer_types=['full_attention'] * 2)),
    'exaone_moe': ('ExaoneMoeConfig', 'ExaoneMoeForCausalLM', MOE),
    'distilbert': ('DistilBertConfig', 'DistilBertForSequenceClassification', dict(dim=64, hidden_dim=96, n_heads=4,
                                                                                   n_layers=2)),
    'electra': ('ElectraConfig', 'ElectraForSequenceClassification', dict(embedding_size=64)),
    'albert': ('AlbertConfig', 'AlbertForSequenceClassification', dict(embedding_size=64)),
    'modernbert': ('ModernBertConfig', 'ModernBertForSequenceClassification', {}),
    'camembert': ('CamembertConfig', 'CamembertForSequenceClassification', {}),
}
IMAGE = {
    'beit': ('BeitConfig', 'BeitForImageClassification', {}),
    'vit_msn': ('ViTMSNConfig', 'ViTMSNForImageClassification', {}),
    'ijepa': ('IJepaConfig', 'IJepaForImageClassification', {}),
}
# Families whose attention uses complex-number rotary embeddings or in-place slice copies: linear operations
# that the audit's allow-list does not hold yet (its findings must be these and nothing else)
AUDIT_PENDING = {
    'llama4': ('Llama4TextConfig', 'Llama4ForCausalLM', dict(MOE, num_experts_per_tok=1, intermediate_size_mlp=96,
                                                           attention_chunk_size=8)),
    'deepseek_v2': ('DeepseekV2Config', 'DeepseekV2ForCausalLM', dict(
        DEEPSEEK_MOE, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)),
    'deepseek_v3': ('DeepseekV3Config', 'DeepseekV3ForCausalLM', dict(
        DEEPSEEK_MOE, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
        head_dim=8, rope_parameters={'rope_type': 'default', 'rope_theta': 10000.0})),
}
LINEAR_BUT_UNLISTED = {'view_as_complex (ViewAsComplexBackward0)', 'view_as_real (ViewAsRealBackward0)',
                       'copy_ (torch::autograd::CopySlices)'}
# the module class that lxt_ext refuses, by name, when registering on the family
REFUSED = {
    'gpt_oss': ('GptOssConfig', 'GptOssForCausalLM', dict(MOE, layer_types=['sliding_attention', 'full_attention'],
                                                          sliding_window=4), 'GptOssExperts'),
}
# zeroed for conservation: biases and what is added to the input (positions, token types, class tokens)
ADDED = ('position_embeddings.weight', 'embed_positions.weight', 'wpe.weight', 'token_type_embeddings.weight',
         'cls_token', 'mask_token', 'position_embeddings')


def build(config_name, model_name, overrides, vision=False):
    torch.manual_seed(0)
    kwargs = {**(VISION if vision else COMMON), **overrides}
    model = getattr(transformers, model_name)(getattr(transformers, config_name)(**kwargs)).eval()
    if vision:
        return model, torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return model, model.get_input_embeddings()(torch.randint(3, 64, (2, 10))).detach()


def check(model, x, forward, composite, unlisted=frozenset()):
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith('bias') or name.endswith(ADDED):
                parameter.zero_()
        plain = forward(model, x)
    for mode in ('attnlrp', 'cp'):
        report = audit(model, x, forward=forward, composite=composite(attention=mode))
        assert {finding.operation for finding in report.findings} <= unlisted, str(report)
    with Explainer(model, composite(attention='cp', epsilon=1e-9), forward=forward) as attributor:
        output, relevance = attributor(x, TARGET)[:2]
    torch.testing.assert_close(output, plain, rtol=1e-4, atol=1e-5)
    logit = output[:, -1, TARGET] if output.dim() == 3 else output[:, TARGET]
    assert logit.abs().min() > 1e-3
    torch.testing.assert_close(relevance.flatten(1).sum(1), logit, rtol=1e-3, atol=0)


@pytest.mark.parametrize('family', TEXT)
def test_text_family(family):
    model, x = build(*TEXT[family])
    check(model, x, lambda model, x: model(inputs_embeds=x).logits, LanguageTransformer)


@pytest.mark.parametrize('family', AUDIT_PENDING)
def test_family_whose_audit_lists_linear_operations(family):
    """Llama 4 (L2 q/k norm, dense experts, a router subclassing nn.Linear), DeepSeek-V2 and V3 (multi-head
    latent attention, grouped routing): covered (plain output, conservation), and the audit reports only
    linear operations it does not list yet (complex views of the rotary embedding, slice copies)."""
    model, x = build(*AUDIT_PENDING[family])
    check(model, x, lambda model, x: model(inputs_embeds=x).logits, LanguageTransformer, LINEAR_BUT_UNLISTED)


@pytest.mark.parametrize('family', IMAGE)
def test_vision_family(family):
    model, x = build(*IMAGE[family], vision=True)
    check(model, x, lambda model, x: model(pixel_values=x).logits, ViTEpsilon)


@pytest.mark.parametrize('family', REFUSED)
def test_uncovered_family_is_refused_by_name(family):
    config_name, model_name, overrides, refused = REFUSED[family]
    model, _ = build(config_name, model_name, overrides)
    with pytest.raises(NotExplainableError, match=refused):
        LanguageTransformer().register(model)
    assert not any('_lxt_ext_rule' in vars(module) for module in model.modules())


@pytest.mark.parametrize('family', ['olmo', 'olmo2', 'cohere', 'glm', 'stablelm'])
def test_structural_matches_hold_in_bfloat16(family):
    """The numeric checks at registration recognise the norms and MLPs of a bfloat16 model too."""
    model, x = build(*TEXT[family])
    model.to(torch.bfloat16)
    for mode in ('attnlrp', 'cp'):
        audit(model, x.to(torch.bfloat16), forward=lambda model, x: model(inputs_embeds=x).logits,
              composite=LanguageTransformer(attention=mode)).check()
