"""``lxt-ext evaluate --generate N`` (lxt_ext.job.evaluation on the job runner of lxt-ext explain): the per-image
scores against curves written out here (patches zeroed explicitly, the relevance of zennit's own attributor
with the same composite, Captum's InputXGradient), independence of the batch size, resume after lost batches
and under torchrun equal to one uninterrupted process, the papers' protocols, the written statistics against
the per-image rows, and bad arguments as exit status 2."""
import json
import os
import subprocess
import sys

import pytest
import torch
import zennit.attribution

from conftest import ROOT, require_module
from lxt_ext.cli import main
from lxt_ext.composites import ViTEpsilon
from lxt_ext.data import embedded, shapes
from lxt_ext.job.evaluation import BLOCK, collect

METHODS = 'vit_epsilon:cp,gradient_x_input'


def evaluate(out, *extra, images=10, batch_size=4):
    args = ['evaluate', '--generate', str(images), '--methods', METHODS, '--batch-size', str(batch_size),
            '--threads', '1', '--resamples', '500', '--quiet', '--out', str(out), *extra]
    assert main(args) == 0
    return collect(str(out))


def scores(rows):
    """Everything a row records but the attribution time."""
    return [(row['image'], row['label'], row['predicted'], row['logit'],
             {method: {k: v for k, v in values.items() if k != 'seconds'} for method, values in row['scores'].items()})
            for row in rows]


def by_hand(model, x, relevance, target, patch, per_step=1, fill=None):
    """MoRF and LeRF deletion written out: the k patches of largest (smallest) relevance sum, ties in
    position order, replaced by the fill (zeros by default), after every ``per_step`` patches."""
    n, _, h, w = x.shape
    grid = [(r, c) for r in range(0, h, patch) for c in range(0, w, patch)]
    fill = torch.zeros_like(x) if fill is None else fill
    curves = torch.zeros(n, 2, len(grid) // per_step + 1, dtype=torch.float64)
    for i in range(n):
        sums = [float(relevance[i, :, r:r + patch, c:c + patch].sum()) for r, c in grid]
        orders = (sorted(range(len(grid)), key=lambda u: (-sums[u], u)),
                  sorted(range(len(grid)), key=lambda u: (sums[u], u)))
        for o, order in enumerate(orders):
            for step in range(len(grid) // per_step + 1):
                xi = x[i:i + 1].clone()
                for u in order[:step * per_step]:
                    r, c = grid[u]
                    xi[..., r:r + patch, c:c + patch] = fill[i:i + 1, :, r:r + patch, c:c + patch]
                with torch.no_grad():
                    curves[i, o, step] = float(model(xi)[0, target[i]])
    return curves


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp('whole') / 'out'
    return (*evaluate(out, '--protocol', 'attnlrp'), out)


def test_scores_against_curves_written_out(uninterrupted):
    captum_attr = require_module('captum.attr')
    results, rows, settings, _ = uninterrupted
    model = embedded.load_model()
    images, masks, labels = shapes.generate(BLOCK, seed=settings['data_seed'])
    images, masks, labels = images[:10], masks[:10], labels[:10]
    x = (images - embedded.MEAN) / embedded.STD
    # the AttnLRP protocol: true class, patches of the model's size (8) zeroed one per step
    assert settings['target'] == 'label' and settings['patch_size'] == 8 and settings['fill'] == 'zeros'
    assert [row['label'] for row in rows] == labels.tolist()
    with torch.no_grad():
        logits = model(x)
    assert [row['predicted'] for row in rows] == logits.argmax(1).tolist()
    torch.testing.assert_close(torch.tensor([row['logit'] for row in rows]), logits[range(10), labels])
    onehot = torch.eye(5)[labels]
    with zennit.attribution.Gradient(model, ViTEpsilon(epsilon=1e-6, attention='cp')) as attributor:
        # zennit's seed is the output relevance: the logit on the explained class
        _, relevance = attributor(x.clone().requires_grad_(), lambda y: y * onehot)
    explained = {'vit_epsilon:cp': relevance,
                 'gradient_x_input': captum_attr.InputXGradient(model).attribute(x.clone().requires_grad_(),
                                                                                labels)}
    for result in results:
        r = explained[result.name]
        curves = by_hand(model, x, r, labels, 8)
        torch.testing.assert_close(result.morf.double(), curves[:, 0], atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(result.lerf.double(), curves[:, 1], atol=2e-4, rtol=1e-4)
        abpc = curves[:, 1, :-1].add(curves[:, 1, 1:]).mean(1) / 2 - curves[:, 0, :-1].add(curves[:, 0, 1:]).mean(1) / 2
        torch.testing.assert_close(result.abpc.double(), abpc, atol=2e-4, rtol=1e-4)
        positive = r.sum(1).clamp(min=0)
        mass = (positive * masks).flatten(1).sum(1) / positive.flatten(1).sum(1)
        torch.testing.assert_close(result.relevance_mass.double(), mass.double(), atol=1e-5, rtol=1e-5)


def test_images_do_not_depend_on_the_batch_size(tmp_path, uninterrupted):
    results, rows, _ = evaluate(tmp_path / 'out', '--protocol', 'attnlrp', batch_size=3)
    for a, b in zip(results, uninterrupted[0]):
        torch.testing.assert_close(a.abpc, b.abpc, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(a.relevance_mass, b.relevance_mass, atol=1e-5, rtol=1e-5)
    assert [r['label'] for r in rows] == [r['label'] for r in uninterrupted[1]]


def test_resume_after_lost_batches_equals_an_uninterrupted_run(tmp_path, uninterrupted, capsys):
    out = tmp_path / 'out'
    evaluate(out, '--protocol', 'attnlrp')
    # batches 0 and 2 lost (a run killed before their parts were written), and a killed writer's debris
    for b in (0, 2):
        os.unlink(out / 'parts' / f'batch-{b:07d}.jsonl')
    (out / 'curves' / '.tmp-x-batch-0000001.pt.tmp').write_bytes(b'partial')
    os.unlink(out / 'index.jsonl')
    results, rows, _ = evaluate(out, '--protocol', 'attnlrp')
    assert scores(rows) == scores(uninterrupted[1])
    for a, b in zip(results, uninterrupted[0]):
        assert torch.equal(a.morf, b.morf) and torch.equal(a.lerf, b.lerf)
    assert not list(out.rglob('.tmp-*'))
    # other settings in the same folder are refused, naming what changed
    capsys.readouterr()
    assert main(['evaluate', '--generate', '10', '--methods', METHODS, '--batch-size', '4', '--threads', '1',
                 '--quiet', '--out', str(out), '--protocol', 'dynamiclrp']) == 2
    assert 'fill' in capsys.readouterr().err


def test_torchrun_two_processes_equal_one(tmp_path, uninterrupted):
    out = tmp_path / 'out'
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    process = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={port}', '-m', 'lxt_ext',
         'evaluate', '--generate', '10', '--methods', METHODS, '--batch-size', '4', '--threads', '1',
         '--resamples', '500', '--quiet', '--protocol', 'attnlrp', '--out', str(out)],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, 'OMP_NUM_THREADS': '1'}, timeout=600)
    assert process.returncode == 0, process.stderr
    results, rows, _ = collect(str(out))
    assert scores(rows) == scores(uninterrupted[1])
    for a, b in zip(results, uninterrupted[0]):
        assert torch.equal(a.morf, b.morf) and torch.equal(a.lerf, b.lerf)
    assert (out / 'evaluation.md').read_text().count('| vit_epsilon:cp |') >= 1


def test_written_statistics_follow_the_rows(uninterrupted):
    results, rows, settings, folder = uninterrupted
    text = (folder / 'evaluation.md').read_text()
    record = json.loads((folder / 'evaluation.json').read_text())
    correct = sum(r['label'] == r['predicted'] for r in rows)
    assert f'Model accuracy on these images: {correct / 10:.4f} ({10 - correct} of 10 misclassified)' in text
    assert 'Holm-corrected across the 1 pairs' in text and text.startswith('lxt-ext evaluate')
    for result in results:
        abpc = record['methods'][result.name]['intervals']['abpc']
        assert abpc['mean'] == pytest.approx(float(result.abpc.double().mean()), rel=1e-6)
        assert abpc['low'] < abpc['mean'] < abpc['high']
    (pair,) = record['statistics']['abpc']['comparisons']
    a, b = {r.name: r for r in results}[pair['a']], {r.name: r for r in results}[pair['b']]
    assert pair['difference'] == pytest.approx(float((a.abpc.double() - b.abpc.double()).mean()), rel=1e-6)
    assert pair['difference'] >= 0 and pair['p_holm'] == pytest.approx(pair['p'])  # one pair: Holm changes nothing
    assert (folder / 'evaluation.png').stat().st_size > 10_000


def test_dynamiclrp_protocol_blur_and_four_patches_per_step(tmp_path):
    results, rows, settings = evaluate(tmp_path / 'out', '--protocol', 'dynamiclrp', '--methods', 'gradient_x_input',
                                       images=3, batch_size=3)
    assert (settings['fill'], settings['units_per_step']) == ('blur', 4)
    model = embedded.load_model()
    images, _, labels = shapes.generate(BLOCK, seed=settings['data_seed'])
    x = (images[:3] - embedded.MEAN) / embedded.STD
    from lxt_ext.attribution.baselines import gradient_x_input
    from lxt_ext.evaluation import blur
    relevance = gradient_x_input(model, x, labels[:3])
    curves = by_hand(model, x, relevance, labels[:3], 8, per_step=4, fill=blur(x))
    (result,) = results
    assert result.morf.shape == (3, 17)
    torch.testing.assert_close(result.morf.double(), curves[:, 0], atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(result.lerf.double(), curves[:, 1], atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize('argv, message', [
    (['--generate', '4', '--data-seed', '1'], 'training seeds'),
    (['--generate', '4', '--model', 'vit_b_16'], 'use --model embedded'),
    (['--generate', '0'], 'positive'),
    (['--generate', '4', '--protocol', 'attnlrp', '--fill', 'blur'], 'drop --fill blur'),
    (['--generate', '4', '--target', '3'], 'label or predicted'),
    (['--generate', '4', 'some_image.png'], 'give no inputs'),
])
def test_bad_arguments_are_clear_errors(tmp_path, capsys, argv, message):
    assert main(['evaluate', *argv, '--quiet', '--out', str(tmp_path / 'out')]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / 'out').exists()
