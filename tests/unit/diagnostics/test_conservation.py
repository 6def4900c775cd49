"""lxt_ext.diagnostics.conservation: relevance in vs out per module, and the first module where it leaks,
explodes or turns NaN/Inf.

Oracles: the math of the deliberately broken modules (a functional SiLU's plain gradient, a square,
a large epsilon, sqrt at 0, log of a negative number, a gradient scaled by 1e4: each breaks
conservation at a module the test names); for the conservative models (CP-LRP, constants zeroed by hand
on a copy) the explained logit computed directly, the relevance Explainer returns at the input and
at latent layers, and R_in = R_out per module to 1e-4 computed here from the report's sums."""
import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
import transformers
import zennit.rules
from zennit.composites import LayerMapComposite
from zennit.types import Convolution

from lxt_ext.attribution import Explainer
from lxt_ext.composites import EpsilonPlus, LanguageTransformer, ViTEpsilon, ViTGamma
from lxt_ext.diagnostics import ADDITIVE, ConservationError, audit, conservation, zeroed
from lxt_ext.models import KeepGradient
from lxt_ext.rules import Epsilon


class MLP(torch.nn.Module):
    def __init__(self, dim, hidden, act):
        super().__init__()
        self.up, self.act, self.down = torch.nn.Linear(dim, hidden), act, torch.nn.Linear(hidden, dim)

    def forward(self, x):
        return self.down(self.act(self.up(x)))


class FunctionalMLP(MLP):
    """An activation computed functionally that no rule knows (``asinh``): under ``strict=False`` its plain
    gradient, wrong relevance, passes with a warning."""

    def forward(self, x):
        return self.down(torch.asinh(self.up(x)))


class Block(torch.nn.Module):
    def __init__(self, mlp, dim):
        super().__init__()
        self.norm, self.mlp = torch.nn.LayerNorm(dim), mlp

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class Toy(torch.nn.Module):
    """Two pre-norm residual blocks and a head; ``mlps``: a factory ``(index, dim) -> MLP module``."""

    def __init__(self, mlps=lambda i, dim: MLP(dim, 24, torch.nn.SiLU()), dim=16):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = torch.nn.Sequential(*(Block(mlps(i, dim), dim) for i in range(2)))
        self.head = torch.nn.Linear(dim, 5)

    def forward(self, x):
        return self.head(self.blocks(x))


def toy_input():
    return torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(0))


def assert_conserved(report, rtol=1e-4):
    """R_in = R_out in every module (no children's leaks subtracted: every module conserves on its own)."""
    assert report.first is None and report.rtol <= rtol, str(report)
    scale = abs(report.output_relevance)
    assert scale > 1e-3, 'vacuous: the explained output has no relevance'
    for m in report.modules:
        assert m.calls >= 1 and m.status == 'ok', m
        assert abs(m.r_in - m.r_out) <= rtol * max(abs(m.r_out), scale), (m.name, m.r_in, m.r_out)


def test_conservative_toy_passes_and_the_model_is_restored():
    model = Toy()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith('bias'):
                p.normal_()  # biases that would take relevance: zeroed for the check, restored after
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = conservation(model, toy_input(), LanguageTransformer(attention='cp'), target=1, rtol=1e-4)
    assert_conserved(report)
    assert sorted(report.zeroed) == sorted(k for k in before if k.endswith('bias'))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not hasattr(model.head, '_lxt_ext_rule') and not model.head._forward_hooks  # composite and hooks gone
    # with the biases kept, they take relevance: the modules holding them leak
    kept = conservation(model, toy_input(), LanguageTransformer(attention='cp'), target=1, zero_bias=False)
    assert kept.first is not None and kept.first.name == 'head' and kept.first.status == 'leaks'


def test_functional_nonlinearity_is_named_by_its_module():
    with pytest.warns(UserWarning, match=r'asinh in blocks\.\d\.mlp \(FunctionalMLP\)'):
        report = conservation(Toy(lambda i, dim: FunctionalMLP(dim, 24, None)), toy_input(),
                              LanguageTransformer(attention='cp', strict=False))
    # backward order: the second block's MLP is met first; its children conserve, its own code leaks
    assert report.first.name == 'blocks.1.mlp' and report.first.status == 'leaks'
    assert report['blocks.0.mlp'].status == 'leaks'
    for name in ('blocks.1.mlp.up', 'blocks.1.mlp.down', 'blocks.1', 'head', ''):
        assert report[name].status == 'ok', report[name]
    mlp = report['blocks.1.mlp']
    assert mlp.own == pytest.approx(mlp.leak, rel=1e-3) and abs(mlp.own) > 1e-3  # its children: epsilon's 1e-6
    assert report[''].leak == pytest.approx(report['blocks.0.mlp'].leak + mlp.leak, rel=1e-3)
    with pytest.raises(ConservationError, match=r'leaks first .* at blocks\.1\.mlp \(FunctionalMLP\)'):
        report.check()
    # the audit names the same module from the graph alone
    with pytest.warns(UserWarning, match='asinh'):
        found = audit(Toy(lambda i, dim: FunctionalMLP(dim, 24, None)), toy_input(),
                      composite=LanguageTransformer(attention='cp', strict=False)).findings
    assert {f.module for f in found} == {'blocks.0.mlp', 'blocks.1.mlp'}


class Square(torch.nn.Module):
    """A custom element-wise module no table knows: d(x^2)/dx x = 2 x^2, twice the relevance."""

    def forward(self, x):
        return x * x


def test_unmapped_module_is_named_with_its_leak():
    model = Toy(lambda i, dim: MLP(dim, 24, Square() if i == 0 else torch.nn.SiLU()))
    with pytest.warns(UserWarning, match=r'mul in blocks\.0\.mlp\.act \(Square\)'):
        report = conservation(model, toy_input(), LanguageTransformer(attention='cp', strict=False))
    first = report.first
    assert (first.name, first.type, first.status) == ('blocks.0.mlp.act', 'Square', 'leaks')
    assert first.r_in == pytest.approx(2 * first.r_out, rel=1e-5)  # the plain gradient of x^2 doubles R


class WideLinear(torch.nn.Linear):
    """A Linear type of its own, for a layer_map entry on one layer."""


def test_non_conservative_rule_from_the_layer_map_is_named():
    model = Toy(lambda i, dim: MLP(dim, 24, torch.nn.SiLU()))
    wide = WideLinear(24, 16)
    wide.load_state_dict(model.blocks[0].mlp.down.state_dict())
    model.blocks[0].mlp.down = wide
    composite = LanguageTransformer(attention='cp', layer_map=[(WideLinear, Epsilon(epsilon=10.))])
    report = conservation(model, toy_input(), composite)
    first = report.first
    assert (first.name, first.status) == ('blocks.0.mlp.down', 'leaks')
    # epsilon absorbs: R_in = sum_j R_j z_j / (z_j + eps sign z_j), less in magnitude than R_out
    assert abs(first.r_in) < abs(first.r_out)


class SqrtAtZero(torch.nn.Module):
    """x + sqrt(x - x): x in forward, but sqrt's gradient at 0 is inf and reaches x with both signs: NaN."""

    def forward(self, x):
        return x + torch.sqrt(x - x)


class Log(torch.nn.Module):
    def forward(self, x):
        return torch.log(x)


class Amplify(torch.nn.Module):
    """The identity in forward, the gradient times 1e4 in backward (a wrongly scaled custom rule)."""

    def forward(self, x):
        return x * 1e4 - x.detach() * (1e4 - 1)


@pytest.mark.parametrize('module, status', [(SqrtAtZero, 'nan'), (Log, 'nan in forward'), (Amplify, 'explodes')])
def test_nan_inf_and_explosions_are_located(module, status):
    model = Toy(lambda i, dim: MLP(dim, 24, module() if i == 0 else torch.nn.SiLU()))
    # epsilon > 0: the Linear layers run a rule, whose checks stop at the first NaN (with epsilon 0 they keep the
    # plain gradient, unchecked, and the NaN is named at the next module with a rule)
    composite = LanguageTransformer(attention='cp', epsilon=1e-6, layer_map=[(module, KeepGradient())])
    report = conservation(model, toy_input(), composite)
    first = report.first
    assert (first.name, first.type, first.status) == ('blocks.0.mlp.act', module.__name__, status), str(report)
    if status == 'nan':
        assert not first.finite_in and first.finite_out
        # lxt_ext's own check stopped the backward at the next rule, after the report had the origin
        assert 'NonFiniteError' in report.stopped and 'blocks.0.mlp.up' in report.stopped
        assert report['blocks.0.mlp.up'].status == 'nan received'
        assert [report[name].status for name in ('blocks.0.mlp', 'blocks.0', '')] == ['not reached'] * 3
    if status == 'nan in forward':
        assert 'NonFiniteError' in report.stopped and "input of 'blocks.0.mlp.down'" in report.stopped
    if status == 'explodes':
        assert first.r_in == pytest.approx(1e4 * first.r_out, rel=1e-2)  # float32: x * 1e4 - x * 9999 is x to 1e-3
    with pytest.raises(ConservationError, match=f'relevance {status} first .* at blocks.0.mlp.act'):
        report.check()


def zero_constants_by_hand(model, names):
    """A copy of ``model`` with the parameters of ``names`` (suffixes) zeroed, independently of ``zeroed``."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(names):
                p.zero_()
    return model


def small_vit():
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                                                 hidden_dim=32, mlp_dim=64, num_classes=10).eval()
    with torch.no_grad():
        torch.nn.init.normal_(model.heads.head.weight, std=0.5)
        model.class_token.normal_()
        for name, p in model.named_parameters():
            if name.endswith('bias'):
                p.normal_(std=0.1)
    return model


def test_vit_under_cp_lrp_conserves_and_agrees_with_direct_computations():
    model = small_vit()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    report = conservation(model, x, ViTGamma(), target=3, rtol=1e-4)
    assert_conserved(report)
    assert {'encoder.pos_embedding', 'class_token', 'heads.head.bias'} <= set(report.zeroed)
    # the same model with its constants zeroed by hand, attributed by Explainer
    plain = zero_constants_by_hand(model, ('bias', 'pos_embedding', 'class_token'))
    logit = plain(x)[:, 3].sum().item()
    assert report.output_relevance == pytest.approx(logit, rel=1e-6)
    assert report['heads.head'].r_out == pytest.approx(logit, rel=1e-6)
    latent = ['encoder.layers.encoder_layer_1', 'encoder.layers.encoder_layer_0.mlp']
    with Explainer(plain, ViTGamma(), layers=latent) as attributor:
        explanation = attributor(x, 3)
    relevance = explanation.relevance
    assert report[''].r_in == pytest.approx(relevance.sum().item(), rel=1e-5)
    assert report[''].explicit and report['conv_proj'].explicit  # the patch embedding emits relevance
    for name in latent:
        assert report[name].r_out == pytest.approx(explanation.latent[name].sum().item(), rel=1e-5)
    # LXT's published gamma recipe conserves only with the constants zeroed
    leaky = conservation(model, x, ViTGamma(), target=3, zero_bias=False)
    assert leaky.first is not None and leaky.first.status == 'leaks'


def test_attnlrp_attention_is_marked_not_conservative_by_design():
    model = small_vit()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    report = conservation(model, x, ViTEpsilon(attention='attnlrp'), target=3)
    attention = [m for m in report.modules if m.type == 'MultiheadAttention']
    assert len(attention) == 2 and all(m.status == 'attnlrp' for m in attention)
    assert max(abs(m.own) for m in attention) > 1e-3 * abs(report.output_relevance)  # it does not conserve
    assert report.first is None and 'AttnLRP' in report.summary()
    assert report[''].leak == pytest.approx(sum(m.own for m in attention), rel=1e-3)


def test_llama_under_cp_lrp_conserves_to_the_explained_logit():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      head_dim=8)
    model = transformers.LlamaForCausalLM(config).eval()
    embeds = model.get_input_embeddings()(torch.randint(0, 64, (2, 6))).detach()
    report = conservation(model, embeds, LanguageTransformer(attention='cp'),
                          forward=lambda m, x: m(inputs_embeds=x).logits, rtol=1e-4)
    assert_conserved(report)
    top = model(inputs_embeds=embeds).logits[:, -1].max(-1).values.sum().item()
    assert report.output_relevance == pytest.approx(top, rel=1e-6)
    assert report[''].r_in == pytest.approx(top, rel=1e-4)
    assert 'model.layers.1.self_attn' in [m.name for m in report.modules]


class SmallCNN(torch.nn.Sequential):
    def __init__(self, conv=torch.nn.Conv2d):
        torch.manual_seed(0)
        super().__init__(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), conv(8, 8, 3, padding=1),
                         torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(32, 4))


class OtherConv(torch.nn.Conv2d):
    pass


BASE_MAP = [(torch.nn.ReLU, zennit.rules.Pass()), (torch.nn.AdaptiveAvgPool2d, zennit.rules.Norm())]


def test_zennit_hooks_are_read_in_the_explicit_convention():
    """zennit's own rules (hooks, not swapped forwards) and lxt_ext's CNN composites: relevance is the
    gradient itself; the taps sit outside zennit's hooks."""
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    composite = LayerMapComposite([*BASE_MAP, (Convolution, zennit.rules.Epsilon(1e-9)),
                                   (torch.nn.Linear, zennit.rules.Epsilon(1e-9))])
    report = conservation(SmallCNN(), x, composite, target=2, rtol=1e-4)
    assert_conserved(report)
    assert all(m.explicit for m in report.modules)
    assert report[''].r_in == pytest.approx(report.output_relevance, rel=1e-4)
    # the seed at the output is relevance: the explained logit (of the model with its biases zeroed)
    logit = zero_constants_by_hand(SmallCNN(), ('bias',))(x)[:, 2].sum().item()
    assert report.output_relevance == pytest.approx(logit, rel=1e-6)
    assert_conserved(conservation(SmallCNN(), x, EpsilonPlus(), target=2, rtol=1e-4))
    # one layer with a large epsilon: named
    composite = LayerMapComposite([*BASE_MAP, (OtherConv, zennit.rules.Epsilon(100.)), (Convolution,
                                   zennit.rules.Epsilon(1e-9)), (torch.nn.Linear, zennit.rules.Epsilon(1e-9))])
    report = conservation(SmallCNN(OtherConv), x, composite, target=2)
    assert (report.first.name, report.first.status) == ('2', 'leaks')


def test_zeroed_restores_bitwise_and_bad_input_is_named():
    model = small_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with zeroed(model) as names:
        assert all(not model.state_dict()[n].any() for n in names)
        assert 'encoder.layers.encoder_layer_0.mlp.0.bias' in names
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert '*bias' in ADDITIVE
    with pytest.raises(TypeError, match='floating tensor input'):
        conservation(model, torch.ones(2, 3, 32, 32, dtype=torch.long))
    with pytest.raises(ValueError, match="convention must be"):
        conservation(model, torch.ones(2, 3, 32, 32), convention='gxi')


def check_command(capsys, *argv):
    """``lxt-ext check`` through its own parser: ``(exit status, stdout, stderr)``."""
    import argparse

    from lxt_ext.cli import check

    parser = argparse.ArgumentParser()
    check.add_arguments(parser)
    status = check.run(parser.parse_args([str(a) for a in argv]))
    out = capsys.readouterr()
    return status, out.out, out.err


def test_check_command_on_local_hugging_face_folders(tmp_path, capsys):
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, head_dim=8))
    llama.save_pretrained(tmp_path / 'llama')
    status, out, err = check_command(capsys, tmp_path / 'llama', '--tokens', 6, '--batch-size', 2)
    assert status == 0, err
    assert 'model.layers.1.self_attn' in out and 'relevance is conserved in all' in out
    status, out, err = check_command(capsys, tmp_path / 'llama', '--text', 'hello world')
    assert status == 2 and '--text needs a tokenizer' in err
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token='<unk>'))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(['hello world'] * 4, trainers.BpeTrainer(vocab_size=40, special_tokens=['<unk>'],
                                                                          show_progress=False))
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer).save_pretrained(tmp_path / 'llama')
    status, out, err = check_command(capsys, tmp_path / 'llama', '--text', 'hello world')
    assert status == 0 and 'relevance is conserved in all' in out, err
    # a config without weights (porting: random weights); GPT-2 adds position embeddings (wpe) to the
    # input: kept, they take relevance in the module that adds them
    transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                            architectures=['GPT2LMHeadModel']).save_pretrained(tmp_path / 'gpt2')
    with pytest.warns(UserWarning, match='no weight files'):
        status, out, err = check_command(capsys, tmp_path / 'gpt2', '--tokens', 6, '--keep-bias')
    assert status == 1 and 'leaks first (in backward order, from the output towards the input) at transformer ' \
        '(GPT2Model)' in out
    with pytest.warns(UserWarning, match='no weight files'):
        status, out, err = check_command(capsys, tmp_path / 'gpt2', '--tokens', 6)
    assert status == 0 and 'transformer.wpe.weight' in out
    # a vision transformer folder
    vit = transformers.ViTForImageClassification(transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, num_labels=5))
    vit.save_pretrained(tmp_path / 'vit')
    status, out, err = check_command(capsys, tmp_path / 'vit', '--attention', 'attnlrp')
    assert status == 0 and 'AttnLRP' in out and 'attnlrp' in out
    status, out, err = check_command(capsys, tmp_path / 'vit', '--composite', 'language_transformer')
    assert status == 2 and 'language_transformer does not fit' in err


def test_check_command_on_the_embedded_model(capsys):
    import os

    import lxt_ext.data
    from conftest import require

    folder = os.path.join(os.path.dirname(lxt_ext.data.__file__), 'embedded')
    require(os.path.isfile(os.path.join(folder, 'model.json')), f'the embedded model is not shipped yet ({folder})')
    status, out, err = check_command(capsys, 'embedded', '--batch-size', 2)
    assert status == 0, out + err
    assert 'conv_proj' in out and 'relevance is conserved in all' in out


def _timm_vit():
    import timm

    torch.manual_seed(0)
    model = timm.create_model('vit_base_patch16_224', pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                              depth=2, num_heads=4, num_classes=10).eval()
    return model, torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)), None, \
        ViTEpsilon(attention='cp')


def _bert():
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=32, num_labels=3)).eval()
    embeds = model.get_input_embeddings()(torch.randint(0, 64, (2, 6))).detach()
    return model, embeds, lambda m, x: m(inputs_embeds=x).logits, LanguageTransformer(attention='cp')


def _resnet18():
    """BatchNorms with statistics (folded into the rules; running_mean zeroed as a bias), in-place adds
    and ReLUs, one ReLU module called twice per block; zennit's explicit convention."""
    from zennit.torchvision import ResNetCanonizer

    from conftest import randomize_batch_norms

    model = randomize_batch_norms(torchvision.models.resnet18(num_classes=10), 0)
    return model, torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)), None, \
        EpsilonPlus(canonizers=[ResNetCanonizer()])


@pytest.mark.parametrize('build', [_timm_vit, _bert, _resnet18], ids=['timm-vit', 'bert', 'resnet18'])
def test_more_families_conserve(build):
    """Default tolerance (epsilon's designed absorption, eps / |z|, reaches 4e-4 on these random models)."""
    model, x, forward, composite = build()
    report = conservation(model, x, composite, forward=forward)
    assert report.first is None, str(report)
    assert report[''].r_in == pytest.approx(report.output_relevance, rel=2e-3)
    assert len(report.modules) > 20
