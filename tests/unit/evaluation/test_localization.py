"""lxt_ext.evaluation's localisation scores against hand-computed values, an explicit per-sample loop
over the formulas, and Quantus 0.6's RelevanceMassAccuracy and PointingGame."""
import numpy as np
import pytest
import torch

from conftest import require_module
from lxt_ext.evaluation import pointing_game, relevance_mass_accuracy


def test_hand_made_values():
    # sample 0: positive relevance 3 inside, 1 + 2 outside -> 3 / 6; the maximum (3) is inside.
    # sample 1: the -5 inside does not count, 4 inside of 4 + 1 -> 0.8; the maximum (4) is inside.
    # sample 2: all positive relevance (2) outside -> 0; the maximum is outside.
    relevance = torch.tensor([[[3., -1.], [1., 2.]],
                              [[-5., 4.], [1., 0.]],
                              [[-1., 0.], [2., -3.]]], dtype=torch.float64)
    mask = torch.tensor([[[True, False], [False, False]],
                         [[True, True], [False, False]],
                         [[True, True], [False, True]]])
    assert relevance_mass_accuracy(relevance, mask).tolist() == [0.5, 0.8, 0.0]
    assert pointing_game(relevance, mask).tolist() == [1.0, 1.0, 0.0]


def test_channels_are_summed_before_the_positive_part():
    # per pixel, channels (2, -3) sum to -1: negative, so no positive mass inside although channel 0 is positive
    relevance = torch.tensor([[[[2., 1.]], [[-3., 0.]]]])  # (N=1, C=2, H=1, W=2)
    mask = torch.tensor([[[True, False]]])
    assert relevance_mass_accuracy(relevance, mask).tolist() == [0.0]
    assert pointing_game(relevance, mask).tolist() == [0.0]


def test_ties_and_no_positive_relevance():
    # two maximal pixels, one inside: a hit (as Quantus); nothing positive: NaN (0 / 0)
    relevance = torch.tensor([[[1., 1.], [0., 0.]], [[-1., -2.], [0., -1.]]])
    mask = torch.tensor([[[False, True], [False, False]], [[True, False], [False, False]]])
    assert pointing_game(relevance, mask).tolist() == [1.0, 0.0]
    rma = relevance_mass_accuracy(relevance, mask)
    assert rma[0] == 0.5 and torch.isnan(rma[1])


def explicit(relevance, mask):
    """The two formulas, one sample and one pixel at a time in plain Python."""
    rma, hits = [], []
    for r, m in zip(relevance.sum(1).tolist(), mask.tolist()):
        pixels = [(value, inside) for row_r, row_m in zip(r, m) for value, inside in zip(row_r, row_m)]
        rma.append(sum(max(v, 0) for v, inside in pixels if inside) / sum(max(v, 0) for v, _ in pixels))
        top = max(v for v, _ in pixels)
        hits.append(float(any(inside for v, inside in pixels if v == top)))
    return rma, hits


def test_random_batches_match_the_explicit_formulas():
    generator = torch.Generator().manual_seed(0)
    relevance = torch.randn(6, 3, 9, 7, generator=generator, dtype=torch.float64)
    mask = torch.rand(6, 9, 7, generator=generator) < 0.3
    rma, hits = explicit(relevance, mask)
    assert relevance_mass_accuracy(relevance, mask).tolist() == pytest.approx(rma, rel=1e-12)
    assert pointing_game(relevance, mask).tolist() == hits


def test_quantus_agrees():
    quantus = require_module('quantus')
    generator = torch.Generator().manual_seed(1)
    relevance = torch.randn(8, 3, 16, 16, generator=generator)
    mask = torch.rand(8, 16, 16, generator=generator) < 0.25
    # Quantus takes the relevance as given: the same score where it is non-negative
    positive = relevance.sum(1, keepdim=True).clamp(min=0).numpy()
    kwargs = dict(model=None, x_batch=np.zeros((8, 3, 16, 16), np.float32), y_batch=np.zeros(8, int),
                  a_batch=positive, s_batch=mask[:, None].numpy())
    expected_rma = quantus.RelevanceMassAccuracy(disable_warnings=True)(**kwargs)
    expected_hits = quantus.PointingGame(disable_warnings=True)(**kwargs)
    assert relevance_mass_accuracy(relevance, mask).tolist() == pytest.approx(np.array(expected_rma, float), rel=1e-5)
    # the pointing game on the signed relevance: its maximum is positive here, so the same pixel
    assert pointing_game(relevance, mask).tolist() == np.array(expected_hits, float).tolist()


@pytest.mark.parametrize('metric', [relevance_mass_accuracy, pointing_game])
def test_bad_input_is_a_clear_error(metric):
    relevance, mask = torch.rand(2, 4, 4), torch.ones(2, 4, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match=r'mask rows \[1\] are empty'):
        metric(relevance, torch.stack([mask[0], ~mask[1]]))
    with pytest.raises(ValueError, match='same N, H, W'):
        metric(relevance, mask[:, :3])
    with pytest.raises(TypeError, match='bool'):
        metric(relevance, mask.float())
