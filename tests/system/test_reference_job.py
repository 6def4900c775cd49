"""``lxt-ext references`` (``lxt_ext.job.references.ReferenceJob`` on the job runner of lxt-ext explain): each unit's
top-k images by relevance and by activation, streamed in per-batch parts and merged.

Oracles: an explicit loop over the images, one ``lxt_ext.attribution.Explainer`` call per image (its latent
``output * gradient`` is the relevance at the layer), a plain forward for the activations, the values written out
(summed over tokens and a head's channels, divided by the image's summed |value| over the layer's units plus 1e-10)
and ranked per unit by Python's ``sorted``; zennit-crp's in-memory ``TransformerFeatureVisualization`` on the same
images, and its ``get_max_reference`` heatmaps for the conditional heatmaps. Then: resume after lost batches equals
an uninterrupted run, torchrun with 2 processes equals one, the pages and sheets exist and the HTML names every
unit with the merged values, bad arguments exit 2."""
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, require_module

crp = require_module('crp')

from lxt_ext.attribution import Explainer  # noqa: E402
from lxt_ext.cli import main  # noqa: E402
from lxt_ext.composites import ViTGamma  # noqa: E402
from lxt_ext.concepts import (HeadConcept, TransformerCondAttribution, TransformerFeatureVisualization,  # noqa: E402
                              concept_layers, input_taps)
from lxt_ext.data import embedded  # noqa: E402
from lxt_ext.job.evaluation import DEFAULT_SEED, generated  # noqa: E402
from lxt_ext.job.references import ReferenceJob, collect, top_k  # noqa: E402

HEADS, NEURONS = 'encoder.layers.encoder_layer_2.self_attention.heads', 'encoder.layers.encoder_layer_1.mlp.1'
UNITS = {HEADS: [0, 1, 2, 3], NEURONS: [0, 5, 17, 100]}
K = 4
CLI = ['--layer', 'heads:2', '--layer', 'neurons:1', '--units', '0-3', '--k', str(K), '--batch-size', '5',
       '--threads', '1', '--quiet']


def normalise(x):
    return (x - embedded.MEAN) / embedded.STD


def oracle(model, composite, images, target, layers):
    """Per layer and mode ``(values (N, units), tokens (N, units))`` over all units, written out per image."""
    every = concept_layers(model)
    taps = {name: t for name, t in every.taps.items() if name in layers}
    relevance = {name: [] for name in layers}
    with input_taps(model, taps), Explainer(model, composite, layers=list(layers)) as explain:
        for i in range(len(images)):
            latent = explain(normalise(images[i:i + 1]), target=None if target is None else target[i:i + 1]).latent
            for name in layers:
                relevance[name].append(latent[name])
        captured, modules = {}, dict(model.named_modules())
        handles = [modules[name].register_forward_hook(
            lambda module, args, out, name=name: captured.__setitem__(name, out[0] if isinstance(out, tuple) else out))
            for name in layers]
        try:
            with torch.enable_grad():  # lxt_ext's attention rule calls the heads tap where gradients are recorded
                model(normalise(images).requires_grad_())
        finally:
            for handle in handles:
                handle.remove()
    result = {}
    for name in layers:
        for mode, tensor in (('relevance', torch.cat(relevance[name])), ('activation', captured[name].detach())):
            per_token = tensor.reshape(tensor.shape[0], -1, tensor.shape[-1])
            if isinstance(every.layer_map[name], HeadConcept):
                per_token = per_token.reshape(*per_token.shape[:2], -1, every.layer_map[name].head_dim).sum(-1)
            value = per_token.sum(1)
            value = value / (value.abs().sum(1, keepdim=True) + 1e-10)
            # the token of the unit's largest value, and its largest patch (the class token, token 0, left out)
            patches = per_token[:, 1:]
            patch = (patches.argmax(1) + 1).masked_fill(patches.amax(1) == patches.amin(1), -1)  # -1: all equal
            result[name, mode] = value, per_token.argmax(1), patch
    return result


def assert_ranked(rows, values, tokens, patches, unit, k):
    """The job's references of a unit (rows, best first) are the oracle's: each value is the oracle's value of that
    image, rank by rank the oracle's sorted values, the images the oracle's order where values are separated."""
    column = values[:, unit].double()
    tolerance = 1e-4 * column.abs().max().item()
    order = sorted(range(len(column)), key=lambda i: (-column[i].item(), i))[:k]
    assert len(rows) == min(k, len(column))
    for rank, row in enumerate(rows):
        assert row['rank'] == rank
        assert abs(row['value'] - column[row['image']].item()) <= tolerance
        assert abs(row['value'] - column[order[rank]].item()) <= tolerance
        assert row['token'] == int(tokens[row['image'], unit]) and row['patch'] == int(patches[row['image'], unit])
        neighbours = [column[order[r]].item() for r in (rank - 1, rank + 1) if 0 <= r < len(order)]
        if all(abs(n - column[order[rank]].item()) > tolerance for n in neighbours):
            assert row['image'] == order[rank]


@pytest.fixture(scope='module')
def searched(tmp_path_factory):
    """A ReferenceJob over 14 generated images (3 batches of 5 and 4), its output folder and the images."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp('job') / 'out'
    model = embedded.load_model()
    job = ReferenceJob(model, ViTGamma(), [HEADS, NEURONS], str(out), k=K, units=UNITS, generate=14,
                       mean=embedded.MEAN.flatten().tolist(), std=embedded.STD.flatten().tolist(), batch_size=5,
                       progress=False)
    job.run()
    images, _, labels = next(generated(DEFAULT_SEED, [list(range(14))]))
    return job, out, images, labels


def test_references_equal_a_per_image_loop(searched):
    job, out, images, labels = searched
    expected = oracle(embedded.load_model(), ViTGamma(), images, labels, [HEADS, NEURONS])
    found = collect(str(out))
    assert found['images'] == 14
    for name in (HEADS, NEURONS):
        assert found['layers'][name]['units'] == UNITS[name]
        for mode in ('relevance', 'activation'):
            values, tokens, patches = expected[name, mode]
            for unit in UNITS[name]:
                rows = found['layers'][name][mode][str(unit)]
                assert_ranked(rows, values, tokens, patches, unit, K)
                assert all(row['label'] == int(labels[row['image']]) == row['explained'] for row in rows)
    # streamed: each batch's part holds only that batch's top k per unit
    for b in range(3):
        part = torch.load(out / 'topk' / f'batch-{b:07d}.pt', weights_only=True)
        for key, tensor in part.items():
            assert tensor.shape == (min(K, 5 if b < 2 else 4), len(UNITS[key.split(chr(9))[0]]))
            if key.endswith('index'):
                assert tensor.min() >= 5 * b and tensor.max() < 5 * b + 5


def test_references_equal_zennit_crp_in_memory(searched, tmp_path):
    job, out, images, labels = searched
    model = embedded.load_model()
    layers = concept_layers(model)
    layer_map = {name: layers.layer_map[name] for name in (HEADS, NEURONS)}
    attribution = TransformerCondAttribution(model, taps={n: t for n, t in layers.taps.items() if n in layer_map})
    fv = TransformerFeatureVisualization(attribution, torch.utils.data.TensorDataset(images, labels), layer_map,
                                         preprocess_fn=normalise, path=tmp_path)
    fv.run(ViTGamma(), 0, len(images), batch_size=7)
    found = collect(str(out))
    for name in layer_map:
        for mode in ('relevance', 'activation'):
            indices, values, tokens = fv.reference_indices(name, mode, r_range=(0, K))
            for unit in UNITS[name]:
                rows = found['layers'][name][mode][str(unit)]
                theirs = values[:, unit].double()
                tolerance = 1e-4 * theirs.abs().max().item()
                for rank, row in enumerate(rows):
                    assert abs(row['value'] - theirs[rank].item()) <= tolerance
                    neighbours = [theirs[r].item() for r in (rank - 1, rank + 1) if 0 <= r < K]
                    if all(abs(n - theirs[rank].item()) > tolerance for n in neighbours):  # no tie: the same image
                        assert row['image'] == int(indices[rank, unit])
                    if row['image'] == int(indices[rank, unit]):
                        assert row['token'] == int(tokens[rank, unit])
    # the sheets' conditional heatmaps are zennit-crp's get_max_reference heatmaps
    unit = 2
    samples, heatmaps = fv.get_max_reference([unit], HEADS, 'relevance', r_range=(0, K), composite=ViTGamma(),
                                             plot_fn=None)[unit]
    rows = found['layers'][HEADS]['relevance'][str(unit)]
    torch.testing.assert_close(samples, images[[r['image'] for r in rows]], rtol=0, atol=0)
    mine = job.conditional_heatmaps(HEADS, images[[r['image'] for r in rows]], [unit] * K)
    torch.testing.assert_close(mine, heatmaps.float(), rtol=1e-5, atol=1e-6 * heatmaps.abs().max().item())


def test_image_files_with_the_predicted_class(tmp_path):
    images, _, _, names = embedded.load_samples()
    out = tmp_path / 'out'
    assert main(['references', embedded.SAMPLES_DIR, '--layer', 'heads:3', '--k', '3', '--batch-size', '5',
                 '--workers', '0', '--threads', '1', '--quiet', '--out', str(out)]) == 0
    model = embedded.load_model()
    with torch.no_grad():
        predicted = model(normalise(images)).argmax(1)
    heads = concept_layers(model).heads[3]
    expected = oracle(model, ViTGamma(), images, predicted, [heads])
    found = collect(str(out))
    assert found['settings']['target'] == 'predicted'
    for mode in ('relevance', 'activation'):
        values, tokens, patches = expected[heads, mode]
        for unit in range(4):
            rows = found['layers'][heads][mode][str(unit)]
            # the files decode to the samples' pixels exactly (8-bit PNGs)
            assert_ranked(rows, values, tokens, patches, unit, 3)
            assert all(row['path'] == sorted(names)[row['image']] and row['label'] is None for row in rows)
            assert all(row['explained'] == int(predicted[row['image']]) for row in rows)


def test_unreadable_files_are_reported_and_other_images_refused_on_resume(tmp_path, capsys):
    folder = tmp_path / 'images'
    folder.mkdir()
    for name in sorted(os.listdir(embedded.SAMPLES_DIR))[:4]:
        (folder / name).write_bytes((Path(embedded.SAMPLES_DIR) / name).read_bytes())
    (folder / 'broken.png').write_bytes(b'')
    out = tmp_path / 'out'
    argv = ['references', str(folder), '--layer', 'heads:3', '--k', '3', '--workers', '0', '--threads', '1',
            '--quiet', '--out', str(out)]
    assert main(argv + ['--strict']) == 1
    assert 'broken.png: zero-byte file' in capsys.readouterr().out
    found = collect(str(out))
    assert found['images'] == 5 and found['settings']['images'] == 5
    assert all(row['path'] != 'broken.png' for rows in found['layers'][concept_layers(embedded.load_model()).heads[3]]
               ['relevance'].values() for row in rows)
    # the parts name images by their place in the list: another list is refused, not mixed in
    (folder / 'broken.png').unlink()
    assert main(argv) == 2
    assert 'images: 5 -> 4' in capsys.readouterr().err


def test_top_k_is_a_total_order():
    values = torch.tensor([[1.], [2.], [2.], [0.], [2.]])
    indices = torch.tensor([[5], [3], [1], [0], [7]])
    tokens = torch.arange(5)[:, None]
    v, i, t = top_k(values, indices, 2, tokens)
    assert v.flatten().tolist() == [2., 2.] and i.flatten().tolist() == [1, 3] and t.flatten().tolist() == [2, 1]
    # the top k of a union is the top k of the parts' tops, whatever the split
    parts = [top_k(values[a:b], indices[a:b], 2, tokens[a:b]) for a, b in ((0, 2), (2, 5))]
    joined = [torch.cat(x) for x in zip(*parts)]
    merged = top_k(joined[0], joined[1], 2, joined[2])
    assert all(torch.equal(a, b) for a, b in zip(merged, (v, i, t)))


def references(out, *extra, images=12):
    assert main(['references', '--generate', str(images), *CLI, '--out', str(out), *extra]) == 0
    return collect(str(out))


def files(out):
    """Every output's bytes but run.json's."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob('*'))
            if p.is_file() and p.name != 'run.json'}


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp('whole') / 'out'
    return references(out), out


def test_pages_and_sheets_name_every_unit_with_the_merged_values(uninterrupted):
    found, out = uninterrupted
    assert (out / 'index.html').is_file()
    for name in (HEADS, NEURONS):
        folder = out / 'layers' / name
        page = (folder / 'index.html').read_text()
        tables = re.findall(r'<table class="refs" data-unit="(\d+)" data-mode="(\w+)">(.*?)</table>', page, re.S)
        assert sorted((int(u), m) for u, m, _ in tables) == sorted((u, m) for u in range(4)
                                                                      for m in ('relevance', 'activation'))
        for unit, mode, body in tables:
            values = [float(v) for v in re.findall(r'data-value="([^"]+)"', body)]
            assert values == [row['value'] for row in found['layers'][name][mode][unit]]
            strip = folder / 'units' / f'{mode}-{int(unit):04d}.png'
            assert f'src="units/{mode}-{int(unit):04d}.png"' in page and strip.stat().st_size > 5000
        for mode in ('relevance', 'activation'):
            from PIL import Image
            with Image.open(folder / f'{mode}-1.png') as sheet:
                assert sheet.width > 4 * 128 and sheet.height > 4 * 2 * 128  # 4 units, image and heatmap rows
            assert f'href="{mode}-1.png"' in page
        assert f'href="layers/{name}/index.html"' in (out / 'index.html').read_text()


def test_resume_after_lost_batches_equals_an_uninterrupted_run(tmp_path, uninterrupted, capsys):
    found, whole = uninterrupted
    out = tmp_path / 'out'
    references(out)
    for b in (0, 2):  # batches lost (killed before their parts), a killed writer's debris, the merge's outputs lost
        os.unlink(out / 'parts' / f'batch-{b:07d}.jsonl')
    (out / 'topk' / '.tmp-x-batch-0000001.pt.tmp').write_bytes(b'partial')
    for name in ('references.json', 'index.html', 'index.jsonl'):
        os.unlink(out / name)
    os.unlink(out / 'layers' / HEADS / 'relevance-1.png')
    assert references(out) == found
    assert files(out) == files(whole)
    assert 'skipped' in capsys.readouterr().out
    # other settings in the same folder are refused, naming what changed, and nothing is written
    before = files(out)
    assert main(['references', '--generate', '12', *CLI, '--out', str(out), '--max-target', 'max']) == 2
    assert 'max_target' in capsys.readouterr().err
    assert files(out) == before


def test_torchrun_two_processes_equal_one(tmp_path, uninterrupted):
    found, whole = uninterrupted
    out = tmp_path / 'out'
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    process = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={port}', '-m', 'lxt_ext',
         'references', '--generate', '12', *CLI, '--out', str(out)],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, 'OMP_NUM_THREADS': '1'}, timeout=600)
    assert process.returncode == 0, process.stderr
    assert collect(str(out)) == found
    assert files(out) == files(whole)
    assert process.stdout.count('searched') == 1  # rank 0 reports


@pytest.mark.parametrize('argv, message', [
    (['--units', '0-200'], 'units 128-200 out of range'),
    (['--units', '3-1'], '--units takes'),
    (['--layer', 'neurons:7'], 'the block must be'),
    (['--layer', 'encoder.nothing'], "unknown layer 'encoder.nothing'"),
    (['--k', '0'], '--k must be at least 1'),
    (['--generate', '0'], '--generate must be positive'),
    (['--data-seed', '1'], 'training seeds'),
    (['--show', 'image,picture'], '--show takes'),
    (['--target', 'cat'], '--target must be'),
    (['--model', 'vit_b_16'], 'give the images to search'),
    (['--generate', '4', embedded.SAMPLES_DIR], 'not both'),
    ([embedded.SAMPLES_DIR, '--target', 'label'], 'labelled images'),
    (['--threads', '0'], '--threads must be'),
])
def test_bad_arguments_are_clear_errors(tmp_path, capsys, argv, message):
    assert main(['references', *argv, '--quiet', '--out', str(tmp_path / 'out')]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / 'out').exists()
