"""``lxt-ext references --text`` (``lxt_ext.job.references.TextReferenceJob``): each unit's top-k windows of a token
corpus by relevance and by activation for a causal language model, on the job runner of the image search.

A tiny random LLaMA with a WordPiece tokenizer trained here (saved to a tmp folder, read offline). Oracle: an
explicit loop over the windows (tokenised with the same tokenizer, cut the same way), one
``lxt_ext.attribution.Explainer`` call per window explained for the sum of its next-token logits (its latent
``output * gradient`` at the layer is the relevance), a plain forward for the activation, the values written out
(summed over the positions, divided by the window's summed |value| over the layer's units plus 1e-10) and ranked per
unit with Python's ``sorted`` (ties to the smaller window). Then: a resume after lost parts equals an uninterrupted
run, two torchrun processes equal one, another corpus or window is refused, the HTML escapes the text's markup and names every unit, bad arguments
exit 2."""
import json
import os
import re
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import transformers

from conftest import ROOT, require_module

crp = require_module('crp')

from lxt_ext.attribution import Explainer  # noqa: E402
from lxt_ext.cli import main  # noqa: E402
from lxt_ext.composites import LanguageTransformer  # noqa: E402
from lxt_ext.concepts import concept_layers, input_taps, label_text_units  # noqa: E402
from lxt_ext.job.references import collect  # noqa: E402

torch.set_num_threads(1)

SENTENCES = ['The quick brown fox jumps over the lazy dog.', 'A journey of a thousand miles begins with one step.',
             'Relevance flows from the output back to the input tokens.', 'Every layer keeps the sum of relevance.',
             'Paris is the capital of France, and Berlin is the capital of Germany.', '<b>bold</b> & <i>tags</i>']
WINDOW, K = 8, 3
NEURONS, HEADS = 'model.layers.1.mlp.neurons', 'model.layers.0.self_attn.heads'
UNITS = [0, 1, 3]
ARGS = ['--layer', 'neurons:1', '--layer', 'heads:0', '--units', '0,1,3', '--window', str(WINDOW), '--k', str(K),
        '--batch-size', '3', '--threads', '1', '--quiet']


def tokenizer():
    from tokenizers import BertWordPieceTokenizer
    raw = BertWordPieceTokenizer(lowercase=False)
    raw.train_from_iterator(SENTENCES * 4, vocab_size=200)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=raw, cls_token='[CLS]', sep_token='[SEP]',
                                                unk_token='[UNK]', pad_token='[PAD]', mask_token='[MASK]')


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    """``(folder, model, tokenizer, text files)``: a saved tiny LLaMA and a corpus of two files."""
    base = tmp_path_factory.mktemp('text_references')
    words = tokenizer()
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, bos_token_id=None, eos_token_id=None, pad_token_id=None)).eval()
    folder = base / 'model'
    model.save_pretrained(folder)
    words.save_pretrained(folder)
    files = []
    for i in range(2):
        path = base / f'corpus-{i}.txt'
        path.write_text('\n'.join(SENTENCES[i:] + SENTENCES[:i]) * 2, encoding='utf-8')
        files.append(str(path))
    return folder, model, words, files


def windows(words, files):
    """The windows written out: each file tokenised whole, cut every WINDOW tokens, the partial rest dropped."""
    out = []
    for path in files:
        ids = words(open(path, encoding='utf-8').read(), add_special_tokens=False)['input_ids']
        out += [ids[s:s + WINDOW] for s in range(0, len(ids) - WINDOW + 1, WINDOW)]
    return out


def oracle(model, ids, layer, head_dim=None):
    """Per mode ``{unit: [(value, window, token)] best first}`` of the loop over the windows."""
    layers = concept_layers(model)
    taps = {name: t for name, t in layers.taps.items() if name == layer}
    per_mode = {'relevance': [], 'activation': []}
    embed = model.get_input_embeddings()
    with input_taps(model, taps), Explainer(model, LanguageTransformer(attention='attnlrp'),
                                            lambda m, x: m(inputs_embeds=x), [layer]) as explain:
        for window in ids:
            w = torch.tensor([window])
            seed = torch.zeros(1, WINDOW, len(model.get_output_embeddings().weight))
            for t in range(WINDOW - 1):
                seed[0, t, window[t + 1]] = 1.0
            e = explain(embed(w).detach(), lambda out: out * seed)
            per_mode['relevance'].append(e.latent[layer][0])
            captured = {}
            module = dict(model.named_modules())[layer]
            handle = module.register_forward_hook(lambda m, a, out: captured.__setitem__('a', out))
            with torch.no_grad():
                model(inputs_embeds=embed(w))
            handle.remove()
            per_mode['activation'].append(captured['a'][0])
    result = {}
    for mode, tensors in per_mode.items():
        result[mode] = {}
        for unit in UNITS:
            rows = []
            for i, tensor in enumerate(tensors):
                if head_dim:
                    units = tensor.view(WINDOW, -1, head_dim).sum(-1)
                else:
                    units = tensor
                total = units.sum(0)
                value = float(total[unit] / (total.abs().sum() + 1e-10))
                rows.append((value, i, int(units[:, unit].argmax())))
            result[mode][unit] = sorted(rows, key=lambda r: (-r[0], r[1]))[:K]
    return result


@pytest.fixture(scope='module')
def searched(setup, tmp_path_factory):
    folder, _, _, files = setup
    out = tmp_path_factory.mktemp('searched') / 'out'
    assert main(['references', '--text', *files, '--model', str(folder), *ARGS, '--out', str(out)]) == 0
    return out


@pytest.mark.parametrize('layer', [NEURONS, HEADS])
def test_references_equal_a_per_window_loop(setup, searched, layer):
    _, model, words, files = setup
    ids = windows(words, files)
    found = collect(searched)
    assert found['images'] == len(ids) and found['settings']['window'] == WINDOW
    head_dim = model.config.hidden_size // model.config.num_attention_heads if layer == HEADS else None
    expected = oracle(model, ids, layer, head_dim)
    for mode in ('relevance', 'activation'):
        for unit in UNITS:
            rows = found['layers'][layer][mode][str(unit)]
            assert [r['image'] for r in rows] == [e[1] for e in expected[mode][unit]], (mode, unit)
            assert [r['token'] for r in rows] == [e[2] for e in expected[mode][unit]], (mode, unit)
            assert [r['value'] for r in rows] == pytest.approx([e[0] for e in expected[mode][unit]], rel=1e-4,
                                                               abs=1e-6)
        labels = label_text_units(torch.tensor([[r['image'] for r in found['layers'][layer][mode][str(u)]]
                                                for u in UNITS]).T,
                                  torch.tensor([[r['token'] for r in found['layers'][layer][mode][str(u)]]
                                                for u in UNITS]).T, ids, window=(2, 0), tokenizer=words,
                                  exclude=words.all_special_ids)
        assert [found['layers'][layer]['labels'][mode][str(u)]['label'] for u in UNITS] == [x.label for x in labels]


def test_the_index_holds_the_explained_score(setup, searched):
    _, model, words, files = setup
    ids = windows(words, files)
    rows = [json.loads(line) for line in open(searched / 'index.jsonl', encoding='utf-8')]
    assert len(rows) == len(ids)
    first = torch.tensor([ids[0]])
    with torch.no_grad():
        logits = model(first).logits[0]
    expected = float(sum(logits[t, ids[0][t + 1]] for t in range(WINDOW - 1)))
    assert rows[0]['logit'] == pytest.approx(expected, rel=1e-4)


def test_pages_escape_the_text_and_name_every_unit(setup, searched):
    page = (searched / 'layers' / NEURONS.replace('/', '_') / 'index.html').read_text(encoding='utf-8')
    for unit in UNITS:
        assert f'<h2 id="unit-{unit}">unit {unit}</h2>' in page
    assert '<mark><b>' in page and 'label' in page
    assert '<i>' not in page and '</i>' not in page   # the corpus' markup never reaches the page unescaped
    values = [float(v) for v in re.findall(r'data-value="([^"]+)"', page)]
    found = collect(searched)['layers'][NEURONS]
    assert values[:K] == [r['value'] for r in found['relevance']['0']]
    assert (searched / 'index.html').is_file()


def test_resume_after_lost_parts_equals_an_uninterrupted_run(setup, searched, tmp_path, capsys):
    folder, _, _, files = setup
    out = tmp_path / 'out'
    shutil.copytree(searched, out)
    for name in ('references.json', 'index.jsonl', 'index.html'):
        os.remove(out / name)
    for b in (0, 2):  # batches lost (killed before their index parts), their top-k parts too for batch 2
        os.remove(out / 'parts' / f'batch-{b:07d}.jsonl')
    os.remove(out / 'topk' / 'batch-0000002.pt')
    assert main(['references', '--text', *files, '--model', str(folder), *ARGS, '--out', str(out)]) == 0
    assert 'skipped' in capsys.readouterr().out
    assert collect(out) == collect(searched)
    page = os.path.join('layers', NEURONS, 'index.html')
    assert (out / page).read_text(encoding='utf-8') == (searched / page).read_text(encoding='utf-8')


def test_torchrun_two_processes_equal_one(setup, searched, tmp_path):
    folder, _, _, files = setup
    out = tmp_path / 'out'
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    process = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={port}', '-m', 'lxt_ext',
         'references', '--text', *files, '--model', str(folder), *ARGS, '--out', str(out)],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, 'OMP_NUM_THREADS': '1'}, timeout=600)
    assert process.returncode == 0, process.stderr
    assert collect(out) == collect(searched)
    assert process.stdout.count('searched') == 1  # rank 0 reports


def test_another_corpus_or_window_is_refused(setup, searched, tmp_path, capsys):
    folder, _, _, files = setup
    out = tmp_path / 'out'
    shutil.copytree(searched, out)
    assert main(['references', '--text', files[0], '--model', str(folder), *ARGS, '--out', str(out)]) == 2
    other = tmp_path / 'other.txt'
    other.write_text(open(files[1], encoding='utf-8').read() + ' more', encoding='utf-8')
    assert main(['references', '--text', files[0], str(other), '--model', str(folder), *ARGS, '--out', str(out)]) == 2
    argv = [a if a != str(WINDOW) else '6' for a in ARGS]
    assert main(['references', '--text', *files, '--model', str(folder), *argv, '--out', str(out)]) == 2
    assert 'window' in capsys.readouterr().err


@pytest.mark.parametrize('extra, message', [
    (['--generate', '10'], 'not both'),
    (['image.png'], 'not both'),
    (['--window', '1'], '--window must be at least 2'),
    (['--composite', 'vit_gamma'], '--composite is for images'),
    (['--units', '0,x'], '--units takes'),
    (['--layer', 'neurons:9'], 'neurons'),
    (['--units', '500', '--layer', 'heads:0'], 'out of range'),
    (['--window', '100000'], 'no whole window'),
])
def test_bad_arguments_exit_2(setup, tmp_path, capsys, extra, message):
    folder, _, _, files = setup
    argv = ['references', '--text', *files, '--model', str(folder), '--k', '2', '--quiet', '--out',
            str(tmp_path / 'out'), *extra]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_window_without_text_and_missing_files_exit_2(setup, tmp_path, capsys):
    folder, _, _, files = setup
    assert main(['references', '--generate', '4', '--window', '8', '--out', str(tmp_path / 'a'), '--quiet']) == 2
    assert '--window is for --text' in capsys.readouterr().err
    assert main(['references', '--text', str(tmp_path / 'none.txt'), '--model', str(folder), '--quiet']) == 2
    assert 'no such text file' in capsys.readouterr().err
    assert main(['references', '--text', *files, '--quiet', '--out', str(tmp_path / 'b')]) == 2
    assert '--model FOLDER' in capsys.readouterr().err


def test_the_layer_page_escapes_markup():
    from lxt_ext.visualization.references import text_layer_page

    rows = {'relevance': {'5': [{'rank': 0, 'image': 2, 'path': 'a<b>.txt#0', 'value': 0.5, 'token': 3}]}}
    spans = {'relevance': {'5': [(['<script>alert(1)</script> x '], '<i>', [' & more'])]}}
    labels = {'relevance': {'5': {'label': '<i>', 'purity': 0.75}}}
    page = text_layer_page('layer<x>', [5], rows, spans, labels, ['settings & <more>'])
    assert '<script>' not in page and '<i>' not in page and 'layer<x>' not in page and 'a<b>' not in page
    assert '&lt;script&gt;alert(1)&lt;/script&gt; x <mark><b>&lt;i&gt;</b></mark> &amp; more' in page
    assert '&ldquo;&lt;i&gt;&rdquo; in 75% of the spans' in page and '<h2 id="unit-5">unit 5</h2>' in page
