"""Perturbation faithfulness (lxt_ext.evaluation.perturbation) against closed forms on linear models:
for f(x) = w . x + b every curve is a sum of per-unit contributions ``w_u . (x_u - fill_u)``, so the
curves, their areas and ABPC are written out here by explicit sorting and summation. (Quantus's own
curves are compared in tests/oracle/test_quantus_oracle.py.)"""
import math

import pytest
import torch

from conftest import require_module
from lxt_ext.evaluation import area, blur, faithfulness, perturbation_curve, unit_relevance


class Linear(torch.nn.Module):
    """f(x) = W flatten(x) + b, counting its forward calls and the rows they took."""

    def __init__(self, shape, classes=3, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.nn.Parameter(torch.randn(classes, math.prod(shape), generator=g, dtype=torch.float64))
        self.bias = torch.nn.Parameter(torch.randn(classes, generator=g, dtype=torch.float64))
        self.calls = []

    def forward(self, x):
        self.calls.append(x.shape[0])
        return x.flatten(1) @ self.weight.T + self.bias


def contributions(model, x, fill, target, units):
    """Per-unit share ``w_t . (x - fill)`` of the score, units given as lists of flat element indices."""
    delta = ((x - fill).flatten(1) * model.weight[target]).detach()
    return [[float(delta[i, idx].sum()) for idx in units] for i in range(x.shape[0])]


def pixel_units(h, w, c):
    return [[ch * h * w + r * w + col for ch in range(c)] for r in range(h) for col in range(w)]


def expected_curve(score0, shares, order, step, mode):
    """Deletion: score0 minus the shares removed so far; insertion: the fill's score plus those inserted."""
    steps = math.ceil(len(shares) / step)
    done = [sum(shares[u] for u in order[:min(k * step, len(order))]) for k in range(steps + 1)]
    return [score0 - d for d in done] if mode == 'deletion' else [score0 + d for d in done]


@pytest.mark.parametrize('mode', ['deletion', 'insertion'])
@pytest.mark.parametrize('fill', ['zeros', 'mean'])
def test_pixel_curves_closed_form(mode, fill):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, generator=g)
    model = Linear(x.shape[1:])
    target = torch.tensor([2, 0])
    relevance = torch.randn(x.shape, dtype=torch.float64, generator=g)
    baseline = torch.zeros_like(x) if fill == 'zeros' else x.mean((2, 3), keepdim=True).expand_as(x)
    units = pixel_units(4, 5, 3)
    shares = contributions(model, x, baseline, target, units)
    per_pixel = relevance.sum(1).flatten(1)
    for order in ('morf', 'lerf'):
        curve = perturbation_curve(model, x, relevance, target, order=order, mode=mode, unit='pixel', fill=fill,
                                   units_per_step=3, progress=False)
        for i in range(2):
            ranking = sorted(range(20), key=lambda u: float(per_pixel[i, u]), reverse=order == 'morf')
            start = model(x[i:i + 1] if mode == 'deletion' else baseline[i:i + 1])[0, target[i]].item()
            expected = torch.tensor(expected_curve(start, shares[i], ranking, 3, mode), dtype=torch.float64)
            torch.testing.assert_close(curve[i], expected, rtol=1e-12, atol=1e-12)
            assert curve.shape == (2, 8)  # ceil(20 / 3) = 7 steps + the start


def test_gradient_x_input_is_the_best_deletion_order_on_a_linear_model():
    """With relevance w * x (zero fill), MoRF removes the largest shares first: the curve equals the
    running sum of the shares in descending order, and ABPC is the gap between the two sorted sums."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 1, 6, 6, dtype=torch.float64, generator=g)
    model = Linear(x.shape[1:], classes=2)
    target = torch.tensor([0, 1, 1])
    relevance = x * model.weight[target].view_as(x)
    result = faithfulness(model, x, relevance, target, unit='pixel', progress=False)
    for i in range(3):
        shares = sorted((relevance[i].flatten()).tolist(), reverse=True)
        score = model(x[i:i + 1])[0, target[i]].item()
        morf = torch.tensor([score - sum(shares[:k]) for k in range(37)], dtype=torch.float64)
        lerf = torch.tensor([score - sum(shares[::-1][:k]) for k in range(37)], dtype=torch.float64)
        torch.testing.assert_close(result.morf[i], morf, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(result.lerf[i], lerf, rtol=1e-12, atol=1e-12)
        trapezoid = lambda y: (sum(y.tolist()) - (y[0] + y[-1]).item() / 2) / (len(y) - 1)
        assert result.morf_area[i].item() == pytest.approx(trapezoid(morf), rel=1e-12)
        assert result.abpc[i].item() == pytest.approx(trapezoid(lerf) - trapezoid(morf), rel=1e-12)
        assert result.abpc[i].item() > 0


def test_insertion_abpc_sign():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64, generator=g)
    model = Linear(x.shape[1:], classes=1)
    target = torch.zeros(2, dtype=torch.long)
    relevance = x * model.weight[0].view(1, 1, 4, 4)
    result = faithfulness(model, x, relevance, target, mode='insertion', unit='pixel', progress=False)
    torch.testing.assert_close(result.abpc, area(result.morf) - area(result.lerf), rtol=0, atol=0)
    assert (result.abpc > 0).all()  # inserting the largest shares first raises the score fastest


@pytest.mark.parametrize('size,patch', [((8, 8), 4), ((7, 10), 3)])
def test_patch_units_and_curve(size, patch):
    """Patch relevance is the sum over a centred grid of square cells (Quantus's split of the excess:
    floor before, ceil after); deleting a patch zeros exactly its cells."""
    h, w = size
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 2, h, w, dtype=torch.float64, generator=g)
    relevance = torch.randn(x.shape, dtype=torch.float64, generator=g)
    top, left = (-h % patch) // 2, (-w % patch) // 2
    rows, cols = math.ceil((h + top) / patch), math.ceil((w + left) / patch)
    cells = []
    for r in range(rows):
        for c in range(cols):
            ys = range(max(r * patch - top, 0), min((r + 1) * patch - top, h))
            xs = range(max(c * patch - left, 0), min((c + 1) * patch - left, w))
            cells.append([ch * h * w + y * w + xx for ch in range(2) for y in ys for xx in xs])
    assert sorted(i for cell in cells for i in cell) == list(range(2 * h * w))
    flat = relevance.flatten(1)
    expected = torch.tensor([[float(flat[i, cell].sum()) for cell in cells] for i in range(2)], dtype=torch.float64)
    torch.testing.assert_close(unit_relevance(relevance, x.shape, 'patch', patch), expected, rtol=1e-12, atol=1e-12)

    model = Linear(x.shape[1:])
    target = torch.tensor([1, 2])
    curve = perturbation_curve(model, x, relevance, target, unit='patch', patch_size=patch, progress=False)
    shares = contributions(model, x, torch.zeros_like(x), target, cells)
    for i in range(2):
        ranking = sorted(range(len(cells)), key=lambda u: float(expected[i, u]), reverse=True)
        want = expected_curve(model(x[i:i + 1])[0, target[i]].item(), shares[i], ranking, 1, 'deletion')
        torch.testing.assert_close(curve[i], torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_tokens_with_baseline_tensor_and_max_steps():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 6, 4, dtype=torch.float64, generator=g)
    pad = torch.randn(4, dtype=torch.float64, generator=g)  # e.g. a [PAD] embedding
    model = Linear(x.shape[1:])
    target = torch.tensor([0, 2])
    relevance = torch.randn(2, 6, dtype=torch.float64, generator=g)  # per token
    curve = perturbation_curve(model, x, relevance, target, order='lerf', unit='token', fill=pad,
                               units_per_step=2, max_steps=2, progress=False)
    assert curve.shape == (2, 3)
    units = [[t * 4 + d for d in range(4)] for t in range(6)]
    shares = contributions(model, x, pad.expand_as(x), target, units)
    for i in range(2):
        ranking = sorted(range(6), key=lambda u: float(relevance[i, u]))
        want = expected_curve(model(x[i:i + 1])[0, target[i]].item(), shares[i], ranking, 2, 'deletion')[:3]
        torch.testing.assert_close(curve[i], torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    # relevance shaped like the embeddings is summed over the embedding dimension
    full = relevance[..., None].expand_as(x) / 4
    torch.testing.assert_close(perturbation_curve(model, x, full, target, order='lerf', unit='token', fill=pad,
                                                  units_per_step=2, max_steps=2, progress=False), curve)


def test_tokens_of_a_transformer_by_hand():
    """A small BERT classifier explained on its input embeddings: the MoRF deletion curve equals zeroing
    the most relevant token embeddings one by one in a loop."""
    transformers = require_module('transformers')
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, num_labels=3, max_position_embeddings=16)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).eval()
    ids = torch.randint(50, (2, 7), generator=torch.Generator().manual_seed(1))
    embeds = model.get_input_embeddings()(ids).detach()
    forward = lambda m, e: m(inputs_embeds=e).logits  # noqa: E731
    target = torch.tensor([2, 0])
    relevance = torch.randn(2, 7, generator=torch.Generator().manual_seed(2))
    curve = perturbation_curve(model, embeds, relevance, target, unit='token', forward=forward, progress=False)
    for i in range(2):
        order = sorted(range(7), key=lambda t: float(relevance[i, t]), reverse=True)
        expected = []
        for k in range(8):
            e = embeds[i:i + 1].clone()
            e[0, order[:k]] = 0
            with torch.no_grad():
                expected.append(float(forward(model, e)[0, target[i]]))
        torch.testing.assert_close(curve[i], torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-5)


def test_ties_go_in_position_order_in_both_orders():
    x = torch.arange(1., 10., dtype=torch.float64).view(1, 1, 3, 3)
    model = Linear(x.shape[1:], classes=1)
    relevance = torch.ones_like(x)
    relevance[0, 0, 2, 2] = 5.0  # one distinct unit, the rest tied
    target = torch.zeros(1, dtype=torch.long)
    result = faithfulness(model, x, relevance, target, unit='pixel', progress=False)
    shares = (x * model.weight[0].view_as(x)).flatten().tolist()
    score = model(x)[0, 0].item()
    morf_order = [8, 0, 1, 2, 3, 4, 5, 6, 7]
    lerf_order = [0, 1, 2, 3, 4, 5, 6, 7, 8]
    torch.testing.assert_close(result.morf[0], torch.tensor(expected_curve(score, shares, morf_order, 1, 'deletion'),
                                                            dtype=torch.float64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(result.lerf[0], torch.tensor(expected_curve(score, shares, lerf_order, 1, 'deletion'),
                                                            dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_one_forward_per_step_for_the_whole_batch():
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    model = Linear(x.shape[1:])
    faithfulness(model, x, torch.randn(x.shape, dtype=torch.float64), torch.tensor([0, 1, 2]), unit='patch',
                 patch_size=2, progress=False)
    assert model.calls == [6] * 5  # 4 patches: 5 steps, MoRF and LeRF rows (2 x 3) in each forward


def test_blur_fill_is_a_gaussian_filter():
    scipy_ndimage = require_module('scipy.ndimage')
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 12, 11, dtype=torch.float64, generator=g)
    ours = blur(x, sigma=1.0)
    # torch's reflect padding is scipy's 'mirror'; a radius of ceil(3 sigma) is truncate=3
    theirs = scipy_ndimage.gaussian_filter(x.numpy(), sigma=(0, 0, 1.0, 1.0), mode='mirror', truncate=3.0)
    torch.testing.assert_close(ours, torch.from_numpy(theirs), rtol=1e-6, atol=1e-6)
    model = Linear(x.shape[1:])
    target = torch.tensor([0, 1])
    relevance = torch.randn(x.shape, dtype=torch.float64, generator=g)
    curve = perturbation_curve(model, x, relevance, target, unit='patch', patch_size=4, fill='blur', progress=False)
    # the default sigma, and the blurred image is what the last step (everything deleted) scores
    torch.testing.assert_close(curve[:, -1], model(blur(x)).gather(1, target[:, None])[:, 0], rtol=1e-12, atol=1e-12)


def test_area_is_the_normalised_trapezoid():
    y = torch.tensor([[3., 1., 2., 0.]], dtype=torch.float64)
    assert area(y).item() == pytest.approx(((3 + 1) / 2 + (1 + 2) / 2 + (2 + 0) / 2) / 3)


def test_bad_input_is_named():
    x = torch.randn(2, 1, 4, 4)
    model = Linear(x.shape[1:])
    model.float()
    t = torch.tensor([0, 1])
    r = torch.randn_like(x)
    with pytest.raises(ValueError, match='unit must be one of'):
        perturbation_curve(model, x, r, t, unit='voxel', progress=False)
    with pytest.raises(ValueError, match='mode must be one of'):
        perturbation_curve(model, x, r, t, mode='delete', progress=False)
    with pytest.raises(ValueError, match='image relevance must be'):
        perturbation_curve(model, x, r[:, :, :2], t, unit='pixel', progress=False)
    with pytest.raises(ValueError, match='NaN or Inf'):
        perturbation_curve(model, x, r.masked_fill(r > 0, float('nan')), t, unit='pixel', progress=False)
    with pytest.raises(ValueError, match='target must be'):
        perturbation_curve(model, x, r, torch.tensor([0, 1, 2]), unit='pixel', progress=False)
    with pytest.raises(ValueError, match='fill must be one of'):
        perturbation_curve(model, x, r, t, unit='pixel', fill='noise', progress=False)
    with pytest.raises(ValueError, match='does not broadcast'):
        perturbation_curve(model, x, r, t, unit='pixel', fill=torch.zeros(3), progress=False)
    with pytest.raises(ValueError, match="fill='blur' is for images"):
        perturbation_curve(model, x[:, 0], r[:, 0], t, unit='token', fill='blur', progress=False)
    with pytest.raises(ValueError, match=r"unit='token' takes embeddings"):
        perturbation_curve(model, x, r, t, unit='token', progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA device')
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 8, 8, generator=g)
    relevance = torch.randn(x.shape, generator=g)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.LazyLinear(5))
    model(x)
    target = torch.tensor([1, 4])
    cpu = faithfulness(model, x, relevance, target, unit='patch', patch_size=2, fill='blur', progress=False)
    gpu = faithfulness(model.cuda(), x.cuda(), relevance.cuda(), target.cuda(), unit='patch', patch_size=2,
                       fill='blur', progress=False)
    torch.testing.assert_close(gpu.morf.cpu(), cpu.morf, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gpu.abpc.cpu(), cpu.abpc, rtol=1e-4, atol=1e-4)
