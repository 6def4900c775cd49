"""lxt_ext.diagnostics.audit: operations on the relevance path that no rule covers are reported by
module, operation and source line (functional products, activations, softcaps, F.linear with a
parameter), and every mapped family audits clean under both attention modes."""

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
import transformers

from lxt_ext.diagnostics import UncoveredOperationError, audit, record
from lxt_ext.transformer.elementwise import identity_rule, uniform_product
from lxt_ext.composites import LanguageTransformer, ViTEpsilon, ViTGamma
from lxt_ext.errors import NotExplainableError


def line_of(marker):
    """``file:line`` of the line of this file that carries ``marker``."""
    with open(__file__) as source:
        (number,) = [n for n, line in enumerate(source, 1) if line.rstrip().endswith(marker)]
    return f'{__file__}:{number}'


class PhiLikeMLP(torch.nn.Module):
    """Phi-3's MLP: one Linear for both halves, the gated product computed functionally."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.gate_up_proj = torch.nn.Linear(dim, 2 * hidden, bias=False)
        self.down_proj = torch.nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * F.silu(gate))  # marker: functional product


class RuledMLP(PhiLikeMLP):
    """The same MLP computed through lxt_ext's rules: nothing to report."""

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(uniform_product(up, identity_rule(F.silu, gate)))


class AsinhMLP(PhiLikeMLP):
    """A gate no rule knows (``asinh``): the operation rules refuse it; with ``strict=False`` it passes."""

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * torch.asinh(gate))  # marker: asinh


class Toy(torch.nn.Module):
    """A pre-norm residual block and a head; optionally a Gemma2-like functional ``tanh`` softcap on
    the logits, or a head that is a raw 3-D parameter called with ``F.linear`` (MoE experts)."""

    def __init__(self, mlp=PhiLikeMLP, softcap=None, expert_head=False, dim=16):
        super().__init__()
        torch.manual_seed(0)
        self.norm = torch.nn.RMSNorm(dim)
        self.mlp = mlp(dim, 24)
        self.head = torch.nn.Linear(dim, 5)
        self.experts = torch.nn.Parameter(torch.randn(2, 5, dim)) if expert_head else None
        self.softcap = softcap

    def forward(self, x):
        h = x + self.mlp(self.norm(x))
        logits = F.linear(h, self.experts[1]) if self.experts is not None else self.head(h)  # marker: expert head
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap  # marker: softcap
        return logits


def toy_input():
    return torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(0))


def test_phi3_like_mlp_is_named_by_module_and_line_without_rules_and_covered_with_them():
    """Without a composite the audit names the functional SiLU and product by module and line; with one, the
    operation rules (lxt_ext.operations) give both their rules: nothing to report."""
    source = line_of('# marker: functional product')
    found = [(f.module, f.module_type, f.operation, f.source) for f in audit(Toy(), toy_input()).findings]
    assert ('mlp', 'PhiLikeMLP', 'silu (SiluBackward0)', source) in found
    assert ('mlp', 'PhiLikeMLP', 'mul (MulBackward0)', source) in found
    report = audit(Toy(), toy_input(), composite=LanguageTransformer(attention='cp'))
    assert report.findings == [] and report.nodes > 0


def test_what_strict_false_let_pass_is_reported():
    source = line_of('# marker: asinh')
    with pytest.warns(UserWarning, match=r'asinh in mlp \(AsinhMLP\)'):
        report = audit(Toy(mlp=AsinhMLP), toy_input(), composite=LanguageTransformer(attention='cp', strict=False))
    assert [(f.module, f.module_type, f.operation, f.source) for f in report.findings] == [
        ('mlp', 'AsinhMLP', 'asinh (AsinhBackward0)', source)]
    assert report.findings[0].reason == 'a non-linear operation'
    with pytest.raises(UncoveredOperationError, match=r'mlp \(AsinhMLP\): asinh \(AsinhBackward0\)') as raised:
        report.check()
    assert isinstance(raised.value, NotExplainableError)
    assert raised.value.report is report


def test_the_same_mlp_through_lxt_ext_rules_is_covered():
    report = audit(Toy(mlp=RuledMLP), toy_input(), composite=LanguageTransformer(attention='cp'))
    assert report.findings == [] and report.nodes > 0
    report.check()


def test_functional_softcap_is_covered():
    """Gemma2's final-logit softcap, ``tanh(logits / cap) * cap``: the operation rules give the tanh the identity
    rule; without them the audit names it."""
    model = Toy(mlp=RuledMLP, softcap=30.)
    assert audit(model, toy_input(), composite=LanguageTransformer()).findings == []
    assert ('', 'Toy', 'tanh (TanhBackward0)', line_of('# marker: softcap')) in [
        (f.module, f.module_type, f.operation, f.source) for f in audit(model, toy_input()).findings]


@pytest.mark.parametrize('frozen', [False, True], ids=['trainable', 'frozen'])
def test_linear_with_a_parameter_gets_the_linear_rule(frozen):
    """A 3-D parameter called with F.linear (transformers 5's MoE experts): the operation rules give it the
    composite's Linear rule (trainable or frozen); relevance is conserved."""
    model = Toy(mlp=RuledMLP, expert_head=True).requires_grad_(not frozen)
    with torch.no_grad():
        model.head.bias.zero_()
    assert audit(model, toy_input(), composite=LanguageTransformer()).findings == []
    x = toy_input().requires_grad_()
    with LanguageTransformer(attention='cp').context(model):
        out = model(x)[..., 0]
        (grad,) = torch.autograd.grad(out, x, out.detach())
    torch.testing.assert_close((x * grad).sum((1, 2)), out.detach().sum(1), rtol=1e-4, atol=1e-6)


def test_record_audits_a_forward_run_by_the_caller():
    model, x = Toy(mlp=AsinhMLP), toy_input().requires_grad_()
    composite = LanguageTransformer(strict=False)
    with composite.context(model), record(model) as recorder, pytest.warns(UserWarning, match='asinh'):
        output = model(x)
    assert [f.operation for f in recorder.report([output], [x]).findings] == ['asinh (AsinhBackward0)']


def test_misuse_is_named():
    model = Toy(mlp=RuledMLP)
    with pytest.raises(ValueError, match='does not depend on the explained input'):
        audit(model, toy_input(), forward=lambda m, x: m(torch.ones(2, 3, 16)))
    with pytest.raises(ValueError, match='does not require grad'):
        audit(model, toy_input(), forward=lambda m, x: m(x).detach())


# Tiny random models of every mapped family: (model, input, forward).
_TEXT = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, head_dim=8)


def _causal_lm(config, model, **overrides):
    def build():
        torch.manual_seed(0)
        lm = model(config(**dict(_TEXT, **overrides))).eval()
        embeds = lm.get_input_embeddings()(torch.randint(0, 64, (2, 6))).detach()
        return lm, embeds, lambda m, x: m(inputs_embeds=x).logits
    return build


def _gpt2():
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4,
                                                                 n_positions=32)).eval()
    return model, model.get_input_embeddings()(torch.randint(0, 64, (2, 6))).detach(), \
        lambda m, x: m(inputs_embeds=x).logits


def _bert():
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=32, num_labels=3)).eval()
    return model, model.get_input_embeddings()(torch.randint(0, 64, (2, 6))).detach(), \
        lambda m, x: m(inputs_embeds=x).logits


def _images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _torchvision_vit():
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                                                 hidden_dim=32, mlp_dim=64, num_classes=10).eval()
    return model, _images(), None


def _timm_vit():
    torch.manual_seed(0)
    model = timm.create_model('vit_base_patch16_224', pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                              depth=2, num_heads=4, num_classes=10).eval()
    return model, _images(), None


def _hf_vit():
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, num_labels=5)).eval()
    return model, _images(), lambda m, x: m(pixel_values=x).logits


FAMILIES = {
    'torchvision-vit': (_torchvision_vit, ViTEpsilon),
    'timm-vit': (_timm_vit, ViTEpsilon),
    'hf-vit': (_hf_vit, ViTGamma),
    'bert': (_bert, LanguageTransformer),
    'gpt2': (_gpt2, LanguageTransformer),
    'llama': (_causal_lm(transformers.LlamaConfig, transformers.LlamaForCausalLM), LanguageTransformer),
    'mistral': (_causal_lm(transformers.MistralConfig, transformers.MistralForCausalLM), LanguageTransformer),
    'qwen2': (_causal_lm(transformers.Qwen2Config, transformers.Qwen2ForCausalLM), LanguageTransformer),
    'qwen3': (_causal_lm(transformers.Qwen3Config, transformers.Qwen3ForCausalLM), LanguageTransformer),
    'gemma': (_causal_lm(transformers.GemmaConfig, transformers.GemmaForCausalLM), LanguageTransformer),
    'gemma2': (_causal_lm(transformers.Gemma2Config, transformers.Gemma2ForCausalLM, attn_logit_softcapping=None,
                          final_logit_softcapping=None), LanguageTransformer),
    # both softcaps (attention 50, final logits 30) get the identity rule of the model-coverage adapters
    'gemma2-softcaps': (_causal_lm(transformers.Gemma2Config, transformers.Gemma2ForCausalLM,
                                   attn_logit_softcapping=50., final_logit_softcapping=30.), LanguageTransformer),
    # the fused gate_up_proj MLP gets the gated-MLP rule (it was the audit's known gap)
    'phi3': (_causal_lm(transformers.Phi3Config, transformers.Phi3ForCausalLM), LanguageTransformer),
    'gemma3': (_causal_lm(transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM), LanguageTransformer),
}


@pytest.mark.parametrize('attention', ['attnlrp', 'cp'])
@pytest.mark.parametrize('family', FAMILIES)
def test_mapped_families_audit_clean(family, attention):
    """No false alarm; and without the composite the same forward is full of findings (the audit
    walked the model's relevance path)."""
    build, composite = FAMILIES[family]
    model, x, forward = build()
    report = audit(model, x, forward, composite(attention=attention))
    assert report.findings == [], str(report)
    assert audit(model, x, forward).findings


