"""``lxt-ext explain`` end to end: outputs and index against a direct attribution (zennit's Gradient with
the same composite), bad inputs reported by path with the same exit status in one process and under
torchrun, resume after kills at several moments equal to an uninterrupted run with no temporary file left,
refused resumes, out-of-memory halving, ``JobSettings`` validation, and torchrun (2 processes, 2 "nodes")
equal to 1 process."""
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, require_module
from lxt_ext import cli



@pytest.fixture(scope='module')
def hf_vit(tmp_path_factory):
    """A tiny random-weight Hugging Face ViT saved as a local model folder (5 classes, 32 x 32)."""
    transformers = require_module('transformers')
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=64, num_labels=5)
    model = transformers.ViTForImageClassification(config).eval()
    folder = tmp_path_factory.mktemp('hf_vit')
    model.save_pretrained(folder)
    return str(folder)


def write_images(folder, count, size=32, seed=0, names=None):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        path = folder / (names[index] if names else f'img{index:02d}.png')
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def read_index(out):
    with open(os.path.join(out, 'index.jsonl')) as file:
        return [json.loads(line) for line in file]


def without_seconds(rows):
    return [{k: v for k, v in row.items() if k != 'seconds'} for row in rows]


def explain(*argv):
    return cli.main(['explain', '--quiet', '--workers', '0', *map(str, argv)])


def test_outputs_and_index_match_a_direct_attribution(tmp_path, hf_vit):
    from transformers import ViTForImageClassification
    from lxt_ext.composites import ViTEpsilon

    images = tmp_path / 'images'
    write_images(images / 'a', 3)
    write_images(images / 'b', 2, seed=1)  # same file names in another folder: no collision
    out = tmp_path / 'out'
    assert explain(images, '--model', hf_vit, '--out', out, '--composite', 'vit_epsilon', '--attention', 'cp',
                   '--relevance', 'npy', '--batch-size', 2) == 0
    rows = read_index(out)
    assert [r['path'] for r in rows] == ['a/img00.png', 'a/img01.png', 'a/img02.png', 'b/img00.png', 'b/img01.png']
    model = ViTForImageClassification.from_pretrained(hf_vit, local_files_only=True, use_kernels=False).eval()
    for row in rows:
        with Image.open(images / row['path']) as image:
            x = torch.from_numpy(np.array(image.convert('RGB'))).permute(2, 0, 1).float()[None] / 255
        x = (x - 0.5) / 0.5
        logits = model(pixel_values=x).logits
        with ViTEpsilon(attention='cp').context(model) as modified:
            xg = x.clone().requires_grad_()
            # the seed is relevance (zennit's convention): the explained logit at its class
            seed = torch.eye(5)[logits.argmax(1)] * logits.detach()
            (expected,) = torch.autograd.grad(modified(pixel_values=xg).logits, xg, seed)
        stored = np.load(out / row['relevance'])
        np.testing.assert_allclose(stored, expected[0].numpy(), rtol=1e-4, atol=1e-6)
        assert row['predicted'] == row['explained'] == int(logits.argmax())
        assert row['logit'] == pytest.approx(float(logits.max().detach()), rel=1e-5)
        assert row['relevance_sum'] == pytest.approx(float(expected.sum()), rel=1e-4, abs=1e-6)
        with Image.open(out / row['heatmap']) as heatmap:
            assert heatmap.size == (32, 32)
    assert (out / 'failures.jsonl').read_text() == ''


def test_bad_images_are_reported_by_path_and_skipped(tmp_path, hf_vit, capsys):
    images = tmp_path / 'images'
    write_images(images, 3)
    (images / 'empty.png').write_bytes(b'')
    (images / 'corrupt.png').write_bytes(b'\x89PNG\r\n\x1a\n' + os.urandom(64))
    (images / 'text.jpg').write_text('not an image')
    (images / 'nothing_here').mkdir()
    out = tmp_path / 'out'
    assert explain(images, '--model', hf_vit, '--out', out) == 0  # reported, not a failure of the run
    failures = [json.loads(line) for line in (out / 'failures.jsonl').read_text().splitlines()]
    assert {f['path']: f['error'] for f in failures}.keys() == {'empty.png', 'corrupt.png', 'text.jpg'}
    assert 'zero-byte' in next(f['error'] for f in failures if f['path'] == 'empty.png')
    assert [r['path'] for r in read_index(out)] == ['img00.png', 'img01.png', 'img02.png']
    captured = capsys.readouterr()
    assert '3 images failed' in captured.out and str(images / 'corrupt.png') in captured.err
    assert all(f'  {f["path"]}: {f["error"]}' in captured.out for f in failures)  # named in the summary
    # --strict: the same run is a failure; the resume retries the failed batches, which fail again
    assert explain(images, '--model', hf_vit, '--out', out, '--strict') == 1
    captured = capsys.readouterr()
    assert '3 images failed' in captured.out and '--strict' in captured.err
    assert [r['path'] for r in read_index(out)] == ['img00.png', 'img01.png', 'img02.png']


def test_wrongly_sized_images_fail_without_resizing(tmp_path, hf_vit):
    images = tmp_path / 'images'
    write_images(images, 2)
    write_images(images, 1, size=40, names=['large.png'])
    out = tmp_path / 'out'
    assert explain(images, '--model', hf_vit, '--out', out, '--resize', 'none', '--strict') == 1
    failures = (out / 'failures.jsonl').read_text()
    assert 'large.png' in failures and '40 x 40' in failures


@pytest.mark.parametrize('argv,message', [
    (['--model', 'resnet18', '--weights', '/no/such/weights.pt'], 'no such weights file'),
    (['--model', 'no_such_model'], "unknown model 'no_such_model'"),
    (['--composite', 'epsilon_gamma_box'], 'does not fit'),
    (['--composite', 'vit_epsilon', '--linear-gamma', '0.1'], 'takes no --linear-gamma'),
])
def test_bad_arguments_are_clear_errors(tmp_path, hf_vit, capsys, argv, message):
    images = tmp_path / 'images'
    write_images(images, 1)
    model = [] if '--model' in argv else ['--model', hf_vit]
    assert explain(images, *model, *argv, '--out', tmp_path / 'out') == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / 'out' / 'index.jsonl').exists()


def test_empty_folder_and_missing_input_are_clear_errors(tmp_path, hf_vit, capsys):
    (tmp_path / 'empty').mkdir()
    assert explain(tmp_path / 'empty', '--model', hf_vit, '--out', tmp_path / 'out') == 2
    assert 'no images' in capsys.readouterr().err
    assert explain(tmp_path / 'missing', '--model', hf_vit, '--out', tmp_path / 'out') == 2
    assert 'no such image file' in capsys.readouterr().err


def test_a_corrupt_weights_file_is_a_clear_error(tmp_path, capsys):
    weights = tmp_path / 'weights.pt'
    weights.write_bytes(b'garbage')
    images = tmp_path / 'images'
    write_images(images, 1)
    assert explain(images, '--model', 'resnet18', '--weights', weights, '--out', tmp_path / 'out') == 2
    assert 'cannot read the weights file' in capsys.readouterr().err


def test_list_files_and_globs(tmp_path, hf_vit):
    images = tmp_path / 'images'
    paths = write_images(images, 4)
    listing = tmp_path / 'list.txt'
    listing.write_text(f'# two of them\nimages/{paths[0].name}\n{paths[2]}\n')
    out = tmp_path / 'out'
    assert explain(listing, str(images / 'img03.*'), '--model', hf_vit, '--out', out) == 0
    assert [r['path'] for r in read_index(out)] == ['img00.png', 'img02.png', 'img03.png']


def test_resume_with_other_settings_is_refused(tmp_path, hf_vit, capsys):
    images = tmp_path / 'images'
    write_images(images, 2)
    out = tmp_path / 'out'
    assert explain(images, '--model', hf_vit, '--out', out) == 0
    before = {p: p.read_bytes() for p in out.rglob('*') if p.is_file()}
    assert explain(images, '--model', hf_vit, '--out', out, '--attention', 'attnlrp') == 2
    assert "attention: None -> 'attnlrp'" in capsys.readouterr().err
    assert explain(images, '--model', hf_vit, '--out', out, '--no-resume') == 2
    assert explain(images, '--model', hf_vit, '--out', out, '--batch-size', 1) == 2  # other batches: other parts
    assert 'batch_size: 16 -> 1' in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob('*') if p.is_file()} == before  # nothing lost or mixed


def test_top_k_and_a_given_target(tmp_path, hf_vit):
    images = tmp_path / 'images'
    write_images(images, 3)
    out = tmp_path / 'topk'
    assert explain(images, '--model', hf_vit, '--out', out, '--top-k', 2, '--relevance', 'safetensors') == 0
    rows = read_index(out)
    assert [(r['path'], r['rank']) for r in rows] == [(f'img0{i}.png', j) for i in range(3) for j in range(2)]
    given = tmp_path / 'given'
    assert explain(images, '--model', hf_vit, '--out', given, '--relevance', 'npy', '--target', 3) == 0
    from safetensors.torch import load_file
    for row, other in zip(rows, read_index(given)):
        assert other['explained'] == 3
        if row['explained'] == 3:  # the same class explained both ways: the same relevance
            file, key = row['relevance'].split(':')
            np.testing.assert_allclose(load_file(out / file)[key].numpy(), np.load(given / other['relevance']),
                                       rtol=1e-5, atol=1e-7)
    assert all(rows[2 * i]['logit'] >= rows[2 * i + 1]['logit'] for i in range(3))


def test_out_of_memory_halves_the_batch(tmp_path, hf_vit, monkeypatch):
    from lxt_ext.attribution import Explainer

    images = tmp_path / 'images'
    write_images(images, 5)
    reference = tmp_path / 'reference'
    assert explain(images, '--model', hf_vit, '--out', reference, '--relevance', 'npy', '--batch-size', 4) == 0
    call = Explainer.__call__

    def small_memory(self, x, *args, **kwargs):
        if x.shape[0] > 1:
            raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB (injected)')
        return call(self, x, *args, **kwargs)
    monkeypatch.setattr(Explainer, '__call__', small_memory)
    out = tmp_path / 'out'
    with pytest.warns(UserWarning, match='out of memory: attributing in batches of 1'):
        assert explain(images, '--model', hf_vit, '--out', out, '--relevance', 'npy', '--batch-size', 4) == 0
    for row, expected in zip(read_index(out), read_index(reference), strict=True):
        for key in ('logit', 'relevance_sum'):  # other batch shapes: other rounding
            assert row.pop(key) == pytest.approx(expected.pop(key), rel=1e-5, abs=1e-7)
        assert without_seconds([row]) == without_seconds([expected])
    for row in read_index(out):
        np.testing.assert_allclose(np.load(out / row['relevance']), np.load(reference / row['relevance']),
                                   rtol=1e-5, atol=1e-7)


# Runs the CLI and SIGKILLs the process (in rank KILL_RANK, or any) just before it renames a temporary file
# into place: the KILL_AT-th rename of this process, or the rename to the file named KILL_NAME. A kill
# there always leaves a temporary file behind, so the test decides the moment rather than a timer.
KILLER = textwrap.dedent('''
    import os, signal, sys, threading
    from lxt_ext.job import outputs
    at, name = int(os.environ.get('KILL_AT', '0')), os.environ.get('KILL_NAME')
    mine = os.environ.get('KILL_RANK', os.environ.get('RANK', '0')) == os.environ.get('RANK', '0')
    replace, renames, lock = os.replace, [0], threading.Lock()
    def killing(source, target):
        if mine and outputs.is_temporary(os.path.basename(source)):
            with lock:
                renames[0] += 1
                if renames[0] == at or os.path.basename(target) == name:
                    os.kill(os.getpid(), signal.SIGKILL)
        replace(source, target)
    os.replace = killing
    from lxt_ext.cli import main
    sys.exit(main(sys.argv[1:]))
''')

# Runs the CLI and records its exit status in STATUS_DIR/rank-<RANK>, then exits with it once every rank has
# recorded its own: torchrun stops the other ranks when one fails, which must not hide what they decided.
STATUS = textwrap.dedent('''
    import os, sys, time
    from lxt_ext.cli import main
    status, folder = main(sys.argv[1:]), os.environ['STATUS_DIR']
    with open(os.path.join(folder, 'rank-' + os.environ['RANK'] + '.tmp'), 'w') as file:
        file.write(str(status))
    os.replace(os.path.join(folder, 'rank-' + os.environ['RANK'] + '.tmp'),
               os.path.join(folder, 'rank-' + os.environ['RANK']))
    deadline = time.monotonic() + 120
    while len([n for n in os.listdir(folder) if not n.endswith('.tmp')]) < int(os.environ['WORLD_SIZE']):
        assert time.monotonic() < deadline, 'another rank never finished'
        time.sleep(0.05)
    sys.exit(status)
''')


def run(argv, env=None, check=True):
    process = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT,
                             env={**os.environ, 'OMP_NUM_THREADS': '1', **(env or {})}, timeout=600)
    if check and process.returncode != 0:
        raise AssertionError(f'{argv} exited {process.returncode}:\n{process.stdout}\n{process.stderr}')
    return process


def outputs(out):
    """Every file's bytes but run.json's and the index's and parts' (they hold per-image seconds)."""
    return {str(path.relative_to(out)): path.read_bytes() for path in sorted(out.rglob('*'))
            if path.is_file() and path.suffix not in ('.json', '.jsonl')}


def temporaries(out):
    return sorted(str(path.relative_to(out)) for path in out.rglob('.tmp-*'))


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def torchrun(*args):
    return [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', *args]


def job_args(images, hf_vit, workers=0):
    return ['explain', str(images), '--model', hf_vit, '--relevance', 'npy', '--batch-size', '2', '--threads', '1',
            '--workers', str(workers), '--quiet']


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory, hf_vit):
    """``(images, out)``: 9 images (5 batches of 2) explained by one uninterrupted process."""
    folder = tmp_path_factory.mktemp('uninterrupted')
    images = folder / 'images'
    write_images(images, 9)
    out = folder / 'out'
    run([sys.executable, '-m', 'lxt_ext', *job_args(images, hf_vit), '--out', str(out)])
    assert len(read_index(out)) == 9 and not temporaries(out)
    return images, out


def test_kills_at_several_moments_then_resume_equal_an_uninterrupted_run(tmp_path, hf_vit, uninterrupted):
    images, whole = uninterrupted
    args = job_args(images, hf_vit, workers=1)  # decoding in a worker process; workers are no setting
    killed = tmp_path / 'killed'
    # while writing run.json; in the first batches (two writer threads); later; while merging the index
    for moment in ({'KILL_AT': '1'}, {'KILL_AT': '4'}, {'KILL_AT': '9'}, {'KILL_NAME': 'index.jsonl'}):
        process = run([sys.executable, '-c', KILLER, *args, '--out', str(killed)], env=moment, check=False)
        assert process.returncode == -signal.SIGKILL, (moment, process.stderr)
        assert temporaries(killed), moment  # the kill left debris for the resume to remove
        assert not (killed / 'index.jsonl').exists()
    assert len(list((killed / 'parts').iterdir())) == 5  # killed while merging: every batch was finished
    resumed = run([sys.executable, '-m', 'lxt_ext', *args, '--out', str(killed)])
    assert 'explained 0 images' in resumed.stdout and '9 skipped' in resumed.stdout
    assert not temporaries(killed)
    assert without_seconds(read_index(killed)) == without_seconds(read_index(whole))
    assert outputs(killed) == outputs(whole)  # bitwise, nothing duplicated or left over


def test_torchrun_two_processes_and_two_nodes_equal_one_process(tmp_path, hf_vit, uninterrupted):
    images, single = uninterrupted
    args = ['-m', 'lxt_ext', *job_args(images, hf_vit)]
    double = tmp_path / 'double'
    run(torchrun(f'--master_port={free_port()}', *args, '--out', str(double)))
    assert without_seconds(read_index(double)) == without_seconds(read_index(single))
    assert outputs(double) == outputs(single)
    # two torchrun "nodes" of one process each on a loopback rendezvous
    nodes = tmp_path / 'nodes'
    port = free_port()
    launched = [subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--nnodes=2', f'--node_rank={rank}',
                                  '--nproc_per_node=1', '--master_addr=127.0.0.1', f'--master_port={port}', *args,
                                  '--out', str(nodes)], cwd=ROOT, env={**os.environ, 'OMP_NUM_THREADS': '1'},
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for rank in range(2)]
    for process in launched:
        stdout, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr
    assert without_seconds(read_index(nodes)) == without_seconds(read_index(single))
    assert outputs(nodes) == outputs(single)


def test_torchrun_killed_ranks_then_resume_equal_one_process(tmp_path, hf_vit, uninterrupted):
    images, single = uninterrupted
    args = job_args(images, hf_vit)
    out = tmp_path / 'out'
    script = tmp_path / 'killer.py'
    script.write_text(KILLER)
    # rank 1 in its first batch (torchrun then stops rank 0 wherever it is); rank 0 while merging the index
    for moment in ({'KILL_RANK': '1', 'KILL_AT': '3'}, {'KILL_RANK': '0', 'KILL_NAME': 'index.jsonl'}):
        killed = run(torchrun(f'--master_port={free_port()}', str(script), *args, '--out', str(out)), env=moment,
                     check=False)
        assert killed.returncode != 0 and not (out / 'index.jsonl').exists(), moment
        assert temporaries(out), moment
    run(torchrun(f'--master_port={free_port()}', '-m', 'lxt_ext', *args, '--out', str(out)))
    assert not temporaries(out)
    assert without_seconds(read_index(out)) == without_seconds(read_index(single))
    assert outputs(out) == outputs(single)


def test_bad_images_under_torchrun_exit_as_in_one_process(tmp_path, hf_vit):
    images = tmp_path / 'images'
    # batches of 2 in name order: rank 0 gets a*, c*; rank 1 gets b* and d.jpg, all three bad images
    write_images(images, 4, names=['a0.png', 'a1.png', 'c0.png', 'c1.png'])
    (images / 'b0.png').write_bytes(b'')
    (images / 'b1.png').write_bytes(b'\x89PNG\r\n\x1a\n' + os.urandom(64))
    (images / 'd.jpg').write_text('not an image')
    script = tmp_path / 'status.py'
    script.write_text(STATUS)
    out = tmp_path / 'out'
    for strict, expected in (([], '0'), (['--strict'], '1')):
        statuses = tmp_path / f'status{len(strict)}'
        statuses.mkdir()
        launched = run(torchrun(f'--master_port={free_port()}', str(script), *job_args(images, hf_vit), *strict,
                                '--out', str(out)), env={'STATUS_DIR': str(statuses)}, check=False)
        # every rank decides the same status, the rank without bad images too
        assert {p.name: p.read_text() for p in statuses.iterdir()} == {'rank-0': expected, 'rank-1': expected}
        assert (launched.returncode == 0) == (expected == '0'), launched.stderr
        assert ('ChildFailedError' in launched.stderr) == bool(strict)
        assert '3 images failed' in launched.stdout and '  b1.png: ' in launched.stdout
        failures = [json.loads(line) for line in (out / 'failures.jsonl').read_text().splitlines()]
        assert [f['path'] for f in failures] == ['b0.png', 'b1.png', 'd.jpg']
        assert [r['path'] for r in read_index(out)] == ['a0.png', 'a1.png', 'c0.png', 'c1.png']
    assert explain(images, '--model', hf_vit, '--out', tmp_path / 'single') == 0  # one process: the same
    assert explain(images, '--model', hf_vit, '--out', tmp_path / 'single', '--strict') == 1


def test_job_settings_are_checked_when_made(tmp_path):
    import dataclasses
    from lxt_ext.job import ExplainJob, JobSettings

    base = dict(inputs=[tmp_path], out=tmp_path / 'out', size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    for bad, message in [({'relevance': 'hdf5'}, 'relevance must be one of'), ({'dtype': 'int8'}, 'dtype must'),
                         ({'target': 1, 'top_k': 2}, 'either a target'), ({'batch_size': 0}, 'batch_size must'),
                         ({'resize': 'crop'}, 'resize must'), ({'inputs': []}, 'no inputs')]:
        with pytest.raises(ValueError, match=message):
            JobSettings(**{**base, **bad})
    settings = JobSettings(**base, identity={'model': 'm'}, batch_size=4)
    assert settings.inputs == (str(tmp_path),) and settings.out == str(tmp_path / 'out')
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.batch_size = 8
    recorded = settings.recorded()
    assert recorded['model'] == 'm' and recorded['batch_size'] == 4 and 'workers' not in recorded
    with pytest.raises(TypeError, match='JobSettings'):
        ExplainJob(torch.nn.Identity(), None, base)


def test_bfloat16_relevance_follows_float32(tmp_path, hf_vit):
    images = tmp_path / 'images'
    write_images(images, 3)
    for dtype in ('float32', 'bfloat16'):
        assert explain(images, '--model', hf_vit, '--out', tmp_path / dtype, '--relevance', 'npy',
                       '--target', 1, '--dtype', dtype) == 0
    for row, half in zip(read_index(tmp_path / 'float32'), read_index(tmp_path / 'bfloat16'), strict=True):
        full = np.load(tmp_path / 'float32' / row['relevance']).ravel()
        low = np.load(tmp_path / 'bfloat16' / half['relevance']).ravel()
        assert low.dtype == np.float32
        assert np.dot(full, low) / (np.linalg.norm(full) * np.linalg.norm(low)) > 0.95
        assert half['logit'] == pytest.approx(row['logit'], rel=0.05, abs=0.02)


def test_readme_explain_snippet_runs(tmp_path, monkeypatch):
    """The Python block after ``<!-- explain-snippet -->`` in README.md, as written there, on a small ViT."""
    import re
    import torchvision

    text = open(os.path.join(ROOT, 'README.md')).read()
    snippet = re.search(r'<!-- explain-snippet -->\n```python\n(.*?)```', text, re.S).group(1)
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(224, 32, 1, 2, 16, 32, num_classes=4).eval()
    torch.nn.init.normal_(model.heads.head.weight, std=0.1)
    write_images(tmp_path / 'photos', 3, size=224)
    monkeypatch.chdir(tmp_path)
    namespace = {'model': model, 'images': torch.rand(3, 3, 224, 224), 'x': torch.randn(2, 3, 224, 224),
                 'normalise': lambda batch: (batch - 0.5) / 0.5, 'MEAN': (0.5,) * 3, 'STD': (0.5,) * 3}
    exec(compile(snippet, 'README.md', 'exec'), namespace)
    assert namespace['e'].relevance.shape == (2, 3, 3, 224, 224)
    assert len(read_index(tmp_path / 'explained')) == 3
