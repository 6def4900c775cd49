"""The embedded default model as shipped: its checksum, its accuracy on freshly drawn held-out images
(lxt_ext.data.shapes with a seed the training never used), its samples, and clear errors for a
corrupt or missing weights file."""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from lxt_ext.data import embedded, shapes
from conftest import ROOT



def test_shipped_weights_match_the_checksum():
    with open(embedded.WEIGHTS, 'rb') as file:
        assert hashlib.sha256(file.read()).hexdigest() == embedded.WEIGHTS_SHA256
    assert os.path.getsize(embedded.WEIGHTS) < 4e6


def test_held_out_accuracy_is_at_least_95_percent():
    torch.set_num_threads(2)
    data = shapes
    assert tuple(embedded.CLASSES) == data.CLASSES and embedded.IMAGE_SIZE == data.IMAGE_SIZE
    images, _, labels = data.generate(400, seed=20261202)  # training used seeds 0..2
    model = embedded.load_model()
    with torch.no_grad():
        predicted = model((images - embedded.MEAN) / embedded.STD).argmax(1)
    correct = int((predicted == labels).sum())
    assert correct * 100 >= 95 * len(labels), f'held-out accuracy {correct} / {len(labels)}'


def test_training_reproduces_the_shipped_accuracy(tmp_path):
    """python/training/train_default_model.py retrains the model from nothing (about 4 minutes on 2 cores) to the
    held-out accuracy recorded for the shipped weights, within one point; --dry-run writes nothing into the
    package."""
    with open(os.path.join(os.path.dirname(embedded.WEIGHTS), 'model.json')) as file:
        shipped = json.load(file)['held_out_accuracy']
    before = os.stat(embedded.WEIGHTS).st_mtime_ns
    script = os.path.join(ROOT, 'python', 'training', 'train_default_model.py')
    run = subprocess.run([sys.executable, script, '--dry-run'],
                         capture_output=True, text=True, cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS='2'))
    assert run.returncode == 0, run.stderr[-2000:]
    accuracy = float(re.search(r'held-out accuracy ([0-9.]+) on 2000 images', run.stdout).group(1))
    assert abs(accuracy - shipped) <= 0.01, f'retrained {accuracy:.4f}, shipped {shipped:.4f}'
    assert os.stat(embedded.WEIGHTS).st_mtime_ns == before


def test_samples_are_images_with_masks_of_their_object():
    images, masks, labels, names = embedded.load_samples()
    n = len(names)
    assert n >= 10 and images.shape == (n, 3, embedded.IMAGE_SIZE, embedded.IMAGE_SIZE)
    assert masks.shape == (n, embedded.IMAGE_SIZE, embedded.IMAGE_SIZE) and masks.dtype == torch.bool
    assert 0 <= images.min() and images.max() <= 1
    assert set(labels.tolist()) == set(range(len(embedded.CLASSES)))  # every class among the samples
    assert sorted(os.listdir(embedded.SAMPLES_DIR)) == sorted(names)  # the folder holds the images only
    for name, label in zip(names, labels):
        assert embedded.CLASSES[label] in name
    # the mask is the object: its pixels are brighter than the (darker) background around it on average
    brightness = images.max(1).values
    for b, m in zip(brightness, masks):
        assert 20 < m.sum() < 0.3 * m.numel()
        assert b[m].mean() > b[~m].mean() + 0.2


def test_corrupt_or_missing_weights_are_a_clear_error(tmp_path):
    corrupt = tmp_path / 'model.pt'
    shutil.copy(embedded.WEIGHTS, corrupt)
    data = bytearray(corrupt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    with pytest.raises(embedded.EmbeddedModelError, match='corrupt or not the shipped file'):
        embedded.load_model(str(corrupt))
    with pytest.raises(embedded.EmbeddedModelError, match='missing.*reinstall'):
        embedded.load_model(str(tmp_path / 'absent.pt'))
    truncated = tmp_path / 'truncated.pt'
    truncated.write_bytes(bytes(data[:1000]))
    with pytest.raises(embedded.EmbeddedModelError, match='corrupt'):
        embedded.load_model(str(truncated))
