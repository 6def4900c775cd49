"""lxt_ext.evaluation against Quantus 0.6 (the oracle; a test-only dependency) on the same model,
inputs and relevance. Quantus's arguments are fixed so both compute the same thing: logits (softmax
off), a 0.0 baseline (its default "black" is the per-image minimum), no normalisation or abs of the
relevance, and tie-free relevance (its argsort is not stable). RegionPerturbation reports
``y(x) - y(x_k)``, PixelFlipping ``y(x_k)`` (per element: single-channel images), both for k >= 1."""
import numpy as np
import pytest
import torch

from conftest import require_module

quantus = require_module('quantus')

from lxt_ext.evaluation import perturbation_curve  # noqa: E402


def model_and_data(channels, size, seed=0, n=3, classes=4):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(channels, 5, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(5, 4, 3, stride=2),
        torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.LazyLinear(classes)).eval()
    x = torch.rand(n, channels, *size, generator=g) + 0.1  # positive: a 0.0 fill changes every element
    model(x)
    relevance = torch.randn(x.shape, generator=g)  # continuous: no ties, in elements or in patch sums
    target = torch.randint(classes, (n,), generator=g)
    return model, x, relevance, target


@pytest.mark.parametrize('order', ['morf', 'lerf'])
@pytest.mark.parametrize('size,patch', [((8, 8), 4), ((10, 9), 4)])
def test_region_perturbation(order, size, patch):
    model, x, relevance, target = model_and_data(3, size)
    metric = quantus.RegionPerturbation(patch_size=patch, order=order, regions_evaluation=4, abs=False,
                                        normalise=False, perturb_baseline=0.0, disable_warnings=True)
    theirs = np.asarray(metric(model=model, x_batch=x.numpy(), y_batch=target.numpy(), a_batch=relevance.numpy(),
                               softmax=False, channel_first=True, device='cpu'))
    curve = perturbation_curve(model, x, relevance, target, order=order, unit='patch', patch_size=patch,
                               max_steps=4, progress=False)
    ours = (curve[:, :1] - curve[:, 1:]).numpy()
    assert theirs.shape == ours.shape == (3, 4)
    assert np.abs(theirs).max() > 1e-3  # the deletions change the logits: not a vacuous comparison
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


def test_pixel_flipping():
    model, x, relevance, target = model_and_data(1, (6, 6), seed=1)
    metric = quantus.PixelFlipping(features_in_step=4, abs=False, normalise=False, perturb_baseline=0.0,
                                   disable_warnings=True)
    theirs = np.asarray(metric(model=model, x_batch=x.numpy(), y_batch=target.numpy(), a_batch=relevance.numpy(),
                               softmax=False, channel_first=True, device='cpu'))
    curve = perturbation_curve(model, x, relevance, target, order='morf', unit='pixel', units_per_step=4,
                               progress=False)
    ours = curve[:, 1:].numpy()
    assert theirs.shape == ours.shape == (3, 9)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


def masks_and_relevance(seed=2):
    g = torch.Generator().manual_seed(seed)
    relevance = torch.randn(4, 3, 7, 7, generator=g)
    mask = torch.rand(4, 7, 7, generator=g) < 0.3
    mask[0] = False
    mask[0, 2:4, 1:5] = True
    # row 3: the maximum (over the channel sum) is put inside the mask, so one hit is guaranteed
    total = relevance.sum(1)
    inside = mask[3].nonzero()[0]
    relevance[3, :, inside[0], inside[1]] += total[3].max() - total[3, inside[0], inside[1]] + 1.
    return relevance, mask


def test_relevance_mass_accuracy():
    from lxt_ext.evaluation.localization import relevance_mass_accuracy
    relevance, mask = masks_and_relevance()
    # lxt_ext's score is the share of the POSITIVE relevance, Quantus's that of the relevance as given:
    # the same for non-negative relevance
    relevance = relevance.abs()
    a = relevance.sum(1, keepdim=True)  # lxt_ext sums channels; Quantus flattens what it is given
    metric = quantus.RelevanceMassAccuracy(abs=False, normalise=False, disable_warnings=True)
    theirs = np.asarray(metric(model=None, x_batch=np.zeros((4, 3, 7, 7), np.float32), y_batch=np.zeros(4, int),
                               a_batch=a.numpy(), s_batch=mask[:, None].numpy().astype(np.float32)))
    ours = relevance_mass_accuracy(relevance, mask)
    np.testing.assert_allclose(ours.numpy(), theirs, rtol=1e-5, atol=1e-6)


def test_pointing_game():
    from lxt_ext.evaluation.localization import pointing_game
    relevance, mask = masks_and_relevance(seed=3)
    a = relevance.sum(1, keepdim=True)
    metric = quantus.PointingGame(abs=False, normalise=False, disable_warnings=True)
    theirs = np.asarray(metric(model=None, x_batch=np.zeros((4, 3, 7, 7), np.float32), y_batch=np.zeros(4, int),
                               a_batch=a.numpy(), s_batch=mask[:, None].numpy().astype(np.float32)), dtype=float)
    ours = pointing_game(relevance, mask)
    assert theirs[3] == 1.0 and set(theirs.tolist()) == {0.0, 1.0}  # both outcomes occur
    np.testing.assert_allclose(ours.numpy().astype(float), theirs)
