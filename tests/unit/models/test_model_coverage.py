"""Every model family lxt_ext's tables map, on a tiny random-weight config (CPU, seconds each).

For each family, against oracles that are not lxt_ext:

- conservation (CP-LRP, every bias-like parameter zeroed, a tiny epsilon): the input relevance sums to
  the explained logit within 1e-3 relative, and so does the relevance of a latent layer's output;
  the forward with the composite registered gives the plain model's output (so the rules compute the
  model, masks, sliding windows and softcaps included);
- removal restores the model bitwise: outputs, plain gradients, state, module attributes and hooks
  (``support.Snapshot``, the model's own state taken before);
- ``lxt_ext.diagnostics.audit`` finds no operation on the relevance path that no rule covers, under
  AttnLRP and CP-LRP.

Families: decoders LLaMA, Mistral (a sequence longer than its sliding window), Qwen2, Qwen3, Gemma,
Gemma 2 (attention softcap 50 and final-logit softcap 30, its defaults), Gemma 3 (sliding window),
Phi-3 (fused ``gate_up_proj``), GPT-2; mixture of experts Mixtral and Qwen3-MoE; encoder-decoder T5
and Flan-T5 (gated-GELU), explained for a decoder logit w.r.t. the encoder and the decoder input
embeddings (concatenated); encoders BERT, RoBERTa (classification and masked-LM heads) and XLM-RoBERTa;
vision towers HF ViT, DeiT, DINOv2 (with and without registers, LayerScale, SwiGLU), CLIP and SigLIP
vision models (SigLIP's attention pooling head included) and SigLIP 2's NaFlex tower (a padded image)
explained w.r.t. pixels with the ViT composites, for a linear probe's logit on the pooled output
(DINOv2 and ViT/DeiT: their own linear classifiers).
"""
import dataclasses
from typing import Callable

import pytest
import torch

from conftest import require_module

transformers = require_module('transformers')

from lxt_ext.attribution import Explainer  # noqa: E402
from lxt_ext.composites import LanguageTransformer, ViTEpsilon, ViTGamma  # noqa: E402
from lxt_ext.diagnostics import audit  # noqa: E402
from support import ForwardOf, Snapshot, freeze_unused, no_lxt_ext_left  # noqa: E402

TOKENS, VOCAB, TARGET = 10, 64, 5


@dataclasses.dataclass
class Case:
    model: torch.nn.Module
    x: torch.Tensor
    forward: Callable
    layers: list            # latent layers whose relevance must sum to the logit too
    vision: bool = False
    zero: tuple = ()        # name suffixes of bias-like parameters to zero for conservation (besides biases)

    def composite(self, attention, epsilon=1e-6, gamma=False):
        if self.vision:
            return ViTGamma(attention=attention) if gamma else ViTEpsilon(epsilon=epsilon, attention=attention)
        return LanguageTransformer(attention=attention, epsilon=epsilon, gamma=0.25 if gamma else None)


def logits(model, x):
    return model(inputs_embeds=x).logits


def decoder(config_name, model_name, **overrides):
    def build():
        kwargs = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      initializer_range=0.2)
        kwargs.update(overrides)
        torch.manual_seed(0)
        model = getattr(transformers, model_name)(getattr(transformers, config_name)(**kwargs)).eval()
        x = model.get_input_embeddings()(torch.randint(0, VOCAB, (2, TOKENS))).detach()
        return Case(model, x, logits, ['model.layers.0', 'model.norm'])
    return build


def gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                     initializer_range=0.2, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    x = model.get_input_embeddings()(torch.randint(0, VOCAB, (2, TOKENS))).detach()
    return Case(model, x, logits, ['transformer.h.0', 'transformer.ln_f'], zero=('wpe.weight',))


def encoder(config_name, model_name, prefix):
    def build():
        torch.manual_seed(0)
        config = getattr(transformers, config_name)(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, num_labels=8, initializer_range=0.2)
        model = getattr(transformers, model_name)(config).eval()
        x = model.get_input_embeddings()(torch.randint(3, VOCAB, (2, TOKENS))).detach()
        # position and token-type embeddings are added to the input: they would absorb relevance
        return Case(model, x, logits, [f'{prefix}.encoder.layer.0', f'{prefix}.encoder.layer.1'],
                    zero=('position_embeddings.weight', 'token_type_embeddings.weight'))
    return build


def t5(gated):
    def build():
        torch.manual_seed(0)
        config = transformers.T5Config(
            vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_decoder_layers=2, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=16, initializer_factor=4.0,
            feed_forward_proj='gated-gelu' if gated else 'relu', decoder_start_token_id=0)
        model = transformers.T5ForConditionalGeneration(config).eval()
        embed = model.get_input_embeddings()
        # encoder tokens, then decoder tokens: one tensor, so that the relevance of both is explained together
        x = torch.cat([embed(torch.randint(0, VOCAB, (2, TOKENS))), embed(torch.randint(0, VOCAB, (2, 6)))],
                      dim=1).detach()

        def forward(model, x):
            return model(inputs_embeds=x[:, :TOKENS], decoder_inputs_embeds=x[:, TOKENS:]).logits
        # every path from either input to the logit passes the decoder's last block
        return Case(model, x, forward, ['decoder.block.1', 'decoder.final_layer_norm'])
    return build


def pixels():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


VISION = dict(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=128, initializer_range=0.2)
TOKEN_PARAMETERS = ('cls_token', 'mask_token', 'distillation_token', 'register_tokens', 'position_embeddings',
                    'class_embedding', 'position_embedding.weight')


def classifier(config_name, model_name, layer, **overrides):
    def build():
        torch.manual_seed(0)
        config = getattr(transformers, config_name)(**{**VISION, 'num_labels': 8, **overrides})
        model = getattr(transformers, model_name)(config).eval()
        return Case(model, pixels(), lambda model, x: model(pixel_values=x).logits,
                    [layer], vision=True, zero=TOKEN_PARAMETERS)
    return build


class LinearProbe(torch.nn.Module):
    """A vision tower and a linear probe on its pooled output (CLIP: the class token after the last
    LayerNorm; SigLIP and SigLIP 2: their attention pooling heads); ``inputs``: the tower's other inputs."""

    def __init__(self, tower, hidden_size, classes=8, **inputs):
        super().__init__()
        self.tower = tower
        self.probe = torch.nn.Linear(hidden_size, classes)
        self.inputs = inputs

    def forward(self, pixel_values):
        return self.probe(self.tower(pixel_values=pixel_values, **self.inputs).pooler_output)


def probed(config_name, model_name, **overrides):
    def build():
        torch.manual_seed(0)
        config = getattr(transformers, config_name)(**{**VISION, **overrides})
        model = LinearProbe(getattr(transformers, model_name)(config), config.hidden_size).eval()
        torch.nn.init.normal_(model.probe.weight, std=0.2)
        return Case(model, pixels(), lambda model, x: model(x), ['tower.encoder.layers.0', 'tower.encoder'],
                    vision=True, zero=TOKEN_PARAMETERS)
    return build


def siglip2():
    """SigLIP 2's NaFlex tower: patches as rows of (channels x patch x patch) pixels, explained w.r.t. them;
    the second image has 3 x 4 patches of the 4 x 4 the batch is padded to (a pixel attention mask)."""
    torch.manual_seed(0)
    config = transformers.Siglip2VisionConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                              intermediate_size=128, patch_size=8, num_patches=16)
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 12:] = 0
    model = LinearProbe(transformers.Siglip2VisionModel(config), 64, pixel_attention_mask=mask,
                        spatial_shapes=torch.tensor([[4, 4], [3, 4]])).eval()
    torch.nn.init.normal_(model.probe.weight, std=0.2)
    x = torch.randn(2, 16, 3 * 8 * 8, generator=torch.Generator().manual_seed(1)) * mask[..., None]
    return Case(model, x, lambda model, x: model(x), ['tower.encoder.layers.0', 'tower.encoder'], vision=True,
                zero=TOKEN_PARAMETERS)


FAMILIES = {
    'llama': decoder('LlamaConfig', 'LlamaForCausalLM'),
    'mistral': decoder('MistralConfig', 'MistralForCausalLM', sliding_window=4),  # shorter than the sequence
    'qwen2': decoder('Qwen2Config', 'Qwen2ForCausalLM'),
    'qwen3': decoder('Qwen3Config', 'Qwen3ForCausalLM', head_dim=16),
    'gemma': decoder('GemmaConfig', 'GemmaForCausalLM', head_dim=16),
    # softcaps at their defaults: attention 50, final logits 30; every layer sliding (window 4) or global
    'gemma2': decoder('Gemma2Config', 'Gemma2ForCausalLM', head_dim=16, sliding_window=4),
    'gemma3': decoder('Gemma3TextConfig', 'Gemma3ForCausalLM', head_dim=16, sliding_window=4,
                      layer_types=['sliding_attention', 'full_attention']),
    'phi3': decoder('Phi3Config', 'Phi3ForCausalLM', pad_token_id=0, bos_token_id=1, eos_token_id=2),
    'gpt2': gpt2,
    'mixtral': decoder('MixtralConfig', 'MixtralForCausalLM', num_local_experts=4, num_experts_per_tok=2),
    'qwen3_moe': decoder('Qwen3MoeConfig', 'Qwen3MoeForCausalLM', head_dim=16, num_experts=4, num_experts_per_tok=2,
                         moe_intermediate_size=48, norm_topk_prob=True),
    't5': t5(gated=False),
    'flan_t5': t5(gated=True),
    'bert': encoder('BertConfig', 'BertForSequenceClassification', 'bert'),
    'roberta': encoder('RobertaConfig', 'RobertaForSequenceClassification', 'roberta'),
    'roberta_mlm': encoder('RobertaConfig', 'RobertaForMaskedLM', 'roberta'),
    'xlm_roberta': encoder('XLMRobertaConfig', 'XLMRobertaForSequenceClassification', 'roberta'),
    'vit': classifier('ViTConfig', 'ViTForImageClassification', 'vit.layers.0'),
    'deit': classifier('DeiTConfig', 'DeiTForImageClassification', 'deit.layers.0'),
    'dinov2': classifier('Dinov2Config', 'Dinov2ForImageClassification', 'dinov2.encoder.layer.0', mlp_ratio=2,
                         layerscale_value=0.5),
    'dinov2_swiglu': classifier('Dinov2Config', 'Dinov2ForImageClassification', 'dinov2.encoder.layer.0',
                                mlp_ratio=2, use_swiglu_ffn=True, layerscale_value=0.5),
    'dinov2_registers': classifier('Dinov2WithRegistersConfig', 'Dinov2WithRegistersForImageClassification',
                                   'dinov2_with_registers.encoder.layer.0', mlp_ratio=2, num_register_tokens=2,
                                   layerscale_value=0.5),
    'clip_vision': probed('CLIPVisionConfig', 'CLIPVisionModel'),
    'siglip_vision': probed('SiglipVisionConfig', 'SiglipVisionModel'),
    'siglip2_vision': siglip2,
}


def zero_bias_like(case):
    with torch.no_grad():
        for name, parameter in case.model.named_parameters():
            if name.endswith('bias') or name.endswith(case.zero):
                parameter.zero_()


def explained(output):
    return output[:, -1, TARGET] if output.dim() == 3 else output[:, TARGET]


@pytest.mark.parametrize('family', FAMILIES)
def test_cp_lrp_conserves_the_logit(family):
    case = FAMILIES[family]()
    zero_bias_like(case)
    with torch.no_grad():
        plain = case.forward(case.model, case.x)
    with Explainer(case.model, case.composite('cp', epsilon=1e-9), forward=case.forward,
                   layers=case.layers) as attributor:
        output, relevance, *_, latents = attributor(case.x, TARGET)
    torch.testing.assert_close(output, plain, rtol=1e-4, atol=1e-5)
    logit = explained(output)
    assert logit.abs().min() > 1e-3, 'a vanishing logit would make the relative check empty'
    sums = relevance.flatten(1).sum(1)
    torch.testing.assert_close(sums, logit, rtol=1e-3, atol=0, msg=lambda m: f'{family} input relevance: {m}')
    for name in case.layers:
        latent = latents[name].flatten(1).sum(1)
        torch.testing.assert_close(latent, logit, rtol=1e-3, atol=0, msg=lambda m: f'{family} {name}: {m}')


@pytest.mark.parametrize('family', FAMILIES)
def test_attnlrp_acts_and_removal_restores_the_model(family):
    """AttnLRP relevance differs from CP-LRP's (its rules act); afterwards the model is bitwise as before."""
    case = FAMILIES[family]()
    wrapped = ForwardOf(case.model, case.forward)
    freeze_unused(wrapped, case.x)
    snapshot = Snapshot(wrapped, case.x)
    results = {}
    for mode in ('attnlrp', 'cp'):
        with Explainer(wrapped, case.composite(mode), forward=lambda model, x: model(x)) as attributor:
            results[mode] = attributor(case.x, TARGET)[1]
        assert torch.isfinite(results[mode]).all()
    scale = results['cp'].abs().max()
    assert scale > 0
    assert (results['attnlrp'] - results['cp']).abs().max() > 1e-3 * scale
    snapshot.assert_same(wrapped, case.x)
    no_lxt_ext_left(wrapped)


@pytest.mark.parametrize('mode', ['attnlrp', 'cp', 'gamma'])
@pytest.mark.parametrize('family', FAMILIES)
def test_audit_finds_no_uncovered_operation(family, mode):
    case = FAMILIES[family]()
    composite = case.composite('cp', gamma=True) if mode == 'gamma' else case.composite(mode)
    audit(case.model, case.x, forward=case.forward, composite=composite).check()


@pytest.mark.parametrize('mode', ['attnlrp', 'cp'])
def test_eager_attention_follows_lxt_formulation(mode):
    """Gemma 2's attention softcap ``c tanh(s / c)``: lxt_ext's eager attention against LXT's way of writing
    the same rules with plain autograd (AttnLRP: query and key gradients / 4, value / 2, the identity rule
    as ``s * stop_gradient(f(s) / s)``, the softmax's own gradient; CP-LRP: query and key stopped), with
    grouped-query heads, a padding mask and the causal mask."""
    from lxt_ext.attention import eager_attention
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 7, 8, generator=generator) * 3
    k, v = (torch.randn(2, 2, 7, 8, generator=generator) * 3 for _ in range(2))
    mask = torch.zeros(2, 1, 7, 7)
    mask[1, :, :, :2] = torch.finfo(torch.float32).min  # the second sequence is left-padded
    seed = torch.randn(2, 4, 7, 8, generator=generator)
    cap, scale = 5.0, 8 ** -0.5

    def scaled(t, factor):
        t = t.clone()
        t.register_hook(lambda g: g / factor)
        return t

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    rq, rk, rv = leaves
    if mode == 'attnlrp':
        rq, rk, rv = scaled(rq, 4), scaled(rk, 4), scaled(rv, 2)
    else:
        rq, rk = rq.detach(), rk.detach()
    rk, rv = rk.repeat_interleave(2, dim=1), rv.repeat_interleave(2, dim=1)
    s = rq @ rk.transpose(-2, -1) * scale
    s = s * (torch.tanh(s / cap) * cap / s).detach()
    s = s + mask
    s = s.masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), float('-inf'))
    expected = torch.softmax(s, dim=-1) @ rv
    expected_grads = torch.autograd.grad(expected, leaves, seed, allow_unused=True)

    mine = [t.clone().requires_grad_() for t in (q, k, v)]
    output = eager_attention(*mine, mask, scale=scale, is_causal=True, softcap=cap, mode=mode)
    grads = torch.autograd.grad(output, mine, seed, allow_unused=True)
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-6)
    for name, grad, reference in zip('qkv', grads, expected_grads):
        if reference is None:
            assert grad is None or torch.count_nonzero(grad) == 0, name
        else:
            torch.testing.assert_close(grad, reference, rtol=1e-4, atol=1e-6, msg=lambda m: f'{name}: {m}')
