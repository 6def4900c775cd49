"""``lxt-ext demo``: the grid and the score tables it writes, its scores recomputed from the baselines and
the explicit formulas, and the claim it exists to show: on the shipped samples, lxt_ext's best ViT
composite puts more of its positive relevance on the object than gradient x input does."""
import argparse
import json

import pytest
import torch
from PIL import Image

from lxt_ext.cli import demo
from lxt_ext.data import embedded


@pytest.fixture(scope='module')
def output(tmp_path_factory):
    out = tmp_path_factory.mktemp('demo')
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    assert demo.run(parser.parse_args(['--out', str(out), '--threads', '2'])) == 0
    return out


def test_grid_has_a_row_per_sample_and_a_column_per_method(output):
    n = len(embedded.load_samples()[3])
    cell = embedded.IMAGE_SIZE * demo.SCALE
    with Image.open(output / 'grid.png') as grid:
        width, height = grid.size
        pixels = torch.frombuffer(bytearray(grid.convert('RGB').tobytes()), dtype=torch.uint8).view(height, width, 3)
    assert width == cell * (1 + len(demo.METHODS))
    assert height - cell * n in range(0, cell)  # a header row above the samples
    body = pixels[height - cell * n:]
    for column in range(1 + len(demo.METHODS)):  # no blank column: every heatmap has structure
        assert body[:, column * cell:(column + 1) * cell].float().std() > 10


def test_tables_hold_every_method(output):
    scores = json.loads((output / 'scores.json').read_text())
    assert list(scores['methods']) == list(demo.METHODS)
    markdown = (output / 'scores.md').read_text()
    for name, values in scores['methods'].items():
        assert f'| {name} | {values["mean_relevance_mass_accuracy"]:.3f} | {values["pointing_game_hit_rate"]:.3f} |' \
            in markdown
        assert 0 <= values['mean_relevance_mass_accuracy'] <= 1 and 0 <= values['pointing_game_hit_rate'] <= 1


def test_gradient_x_input_scores_match_the_explicit_formulas(output):
    """The demo's numbers for gradient x input, recomputed here: x * d f_y / d x of each labelled class by
    autograd, then the share of positive channel-summed relevance on the mask and the argmax pixel."""
    images, masks, labels, _ = embedded.load_samples()
    model = embedded.load_model()
    x = ((images - embedded.MEAN) / embedded.STD).requires_grad_()
    logits = model(x)
    (grad,) = torch.autograd.grad(logits.gather(1, labels[:, None]).sum(), x)
    pixels = (x * grad).detach().sum(1).flatten(1)
    positive = pixels.clamp(min=0)
    rma = (positive * masks.flatten(1)).sum(1) / positive.sum(1)
    hits = masks.flatten(1).gather(1, pixels.argmax(1, keepdim=True))[:, 0].float()
    scores = json.loads((output / 'scores.json').read_text())['methods']['gradient x input']
    assert scores['relevance_mass_accuracy'] == pytest.approx(rma.tolist(), abs=1e-5)
    assert scores['pointing_game'] == hits.tolist()


def test_best_composite_puts_more_relevance_on_the_object_than_gradient_x_input(output):
    methods = json.loads((output / 'scores.json').read_text())['methods']
    best = max(demo.COMPOSITES, key=lambda name: methods[name]['mean_relevance_mass_accuracy'])
    assert methods[best]['mean_relevance_mass_accuracy'] > methods['gradient x input']['mean_relevance_mass_accuracy'], \
        {name: round(values['mean_relevance_mass_accuracy'], 3) for name, values in methods.items()}
