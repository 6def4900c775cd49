"""The zoo sweep (python/benchmarks/zoo_sweep.py) on a few types of four zoos, two children at a time: the verdicts
(a causal LM, a sequence-to-sequence LM w.r.t. both embeddings, a transformers ViT and a CNN, a timm ViT), the
JSON, the tables and the summary it writes, ``--table-from``; and the tiny configs (zoo_configs.py)."""
import json

import pytest

pytest.importorskip('transformers')
pytest.importorskip('timm')
import zoo_configs  # noqa: E402  (python/benchmarks is on the path: tests/conftest.py)
import zoo_sweep  # noqa: E402

TYPES = ['llama', 'bloom', 'musicgen', 't5', 'vit', 'resnet', 'vit_tiny_patch16_224']
ZOOS = ['causal_lm', 'seq2seq_lm', 'image_classification', 'timm_vit']


@pytest.fixture(scope='module')
def swept(tmp_path_factory):
    out = tmp_path_factory.mktemp('zoo')
    argv = TYPES + [arg for zoo in ZOOS for arg in ('--zoo', zoo)] + ['--out', str(out), '--jobs', '2',
                                                                       '--seconds', '300']
    assert zoo_sweep.main(argv) == 0
    return out, {zoo: json.loads((out / f'{zoo}.json').read_text()) for zoo in ZOOS}


def test_text_verdicts(swept):
    _, results = swept
    causal = results['causal_lm']
    assert set(causal) - {'_zoo', '_command', '_transformers', '_timm'} == {'llama', 'bloom', 'musicgen'}
    assert causal['llama']['verdict'] == 'exact' and causal['llama']['error'] <= 1e-3
    assert causal['llama']['composite'] == zoo_sweep.TEXT_COMPOSITE
    # BLOOM's attention (ALiBi, in its own forward): refused by name, or explained exactly once lxt_ext covers it,
    # never a wrong heatmap
    bloom = causal['bloom']
    assert bloom['verdict'] in ('refused', 'exact'), bloom
    if bloom['verdict'] == 'refused':
        assert 'Bloom' in bloom['detail'] and '\n' not in bloom['detail']
    # MusicGen embeds a token per codebook (a ModuleList): no input embeddings to explain
    assert causal['musicgen']['verdict'] == 'not built' and 'ModuleList' in causal['musicgen']['detail']
    # T5 w.r.t. its encoder and decoder embeddings together: conservation over both
    t5 = results['seq2seq_lm']['t5']
    assert t5['verdict'] == 'exact' and t5['error'] <= 1e-3, t5
    assert t5['inputs'] == 'encoder (6) + decoder (4) embeddings'


def test_image_verdicts(swept):
    _, results = swept
    vit = results['image_classification']['vit']
    assert vit['verdict'] == 'exact' and vit['error'] <= 1e-3 and vit['composite'] == zoo_sweep.VIT_COMPOSITE
    # a ResNet under the same composite: convolutions, batch norms (linear in eval mode) and residual sums conserve
    resnet = results['image_classification']['resnet']
    assert resnet['composite'] == zoo_sweep.VIT_COMPOSITE and resnet['verdict'] == 'exact', resnet
    timm_vit = results['timm_vit']['vit_tiny_patch16_224']
    assert timm_vit['verdict'] == 'exact' and timm_vit['error'] <= 1e-3, timm_vit
    assert timm_vit['composite'] == zoo_sweep.VIT_COMPOSITE and timm_vit['architecture'] == 'vit'
    assert results['timm_vit']['_timm'] and results['image_classification']['_transformers']


def test_tables_and_summary(swept, tmp_path):
    out, results = swept
    table = (out / 'causal_lm.md').read_text()
    assert '| llama | exact |' in table and '| musicgen | not built |' in table and '| not built | 1 |' in table
    assert '| vit | exact |' in (out / 'image_classification.md').read_text()
    summary = (out / 'summary.md').read_text()
    counts = {zoo: zoo_sweep.counts_of(results[zoo]) for zoo in ZOOS}
    assert counts['causal_lm']['built'] == 2 and counts['timm_vit']['exact'] == 1
    for zoo in ZOOS:
        c = counts[zoo]
        row = f'| {zoo} | {c["built"]} | ' + ' | '.join(str(c[v]) for v in zoo_sweep.VERDICTS)
        assert row in summary, (row, summary)
    # the transformers zoos together (timm not among them)
    built = sum(counts[zoo]['built'] for zoo in ZOOS[:3])
    exact = sum(counts[zoo]['exact'] for zoo in ZOOS[:3])
    assert f'| transformers (3 zoos) | {built} | {exact} |' in summary
    assert f'{100 * exact / built:.1f} % |' in summary.splitlines()[-1]
    # --table-from re-renders every <zoo>.json of a folder
    assert zoo_sweep.main(['--table-from', str(out), '--out', str(tmp_path)]) == 0
    for zoo in ZOOS:
        assert (tmp_path / f'{zoo}.md').read_text() == (out / f'{zoo}.md').read_text()
    assert (tmp_path / 'summary.md').read_text() == summary


def test_timm_architectures_by_name():
    assert zoo_configs.architecture('vit_tiny_patch16_224') == 'vit'
    assert zoo_configs.architecture('vit_base_patch16_clip_224') == 'vit_clip'
    assert zoo_configs.architecture('vit_small_patch14_reg4_dinov2') == 'vit_reg_dinov2'
    assert zoo_configs.architecture('deit3_small_patch16_224_in21k') == 'deit3'
    assert zoo_configs.architecture('swin_tiny_patch4_window7_224') == 'swin'
    assert zoo_configs.architecture('crossvit_9_dagger_240') == 'crossvit_dagger'


def test_tiny_config_keeps_one_layer_of_each_kind():
    import transformers

    default = transformers.AutoConfig.for_model('gemma3_text')  # five sliding layers, then a full one
    kwargs = zoo_configs.shrink(default)
    assert kwargs['layer_types'] == ['sliding_attention', 'full_attention'] and kwargs['num_hidden_layers'] == 2
    assert kwargs['hidden_size'] == 64 and kwargs['vocab_size'] == 64
    (label, config), *_ = zoo_configs.candidates('gemma3_text')
    assert label == 'tiny' and config.layer_types == ['sliding_attention', 'full_attention']
