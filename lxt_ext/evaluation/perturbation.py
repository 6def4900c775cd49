"""Perturbation faithfulness: delete (or insert) the input's units in the order of their relevance and
record the explained logit after every step.

Units are ``'pixel'`` and ``'patch'`` (square ``patch_size`` cells of a row-major grid; where the image
size is not a multiple of ``patch_size`` the grid is centred, as in Quantus, and the cells of the border
rows and columns are cut, by one pixel more at the bottom/right when the excess is odd) of an image batch
(N, C, H, W), or ``'token'`` of an embedding
batch (N, T, D). A unit's relevance is the sum of the relevance over its elements (channels, the pixels
of a patch, the embedding dimensions); relevance may come shaped like ``x`` or already summed over
channels ((N, H, W)) / embedding dimensions ((N, T)).

Orders: MoRF (most relevant first) and LeRF (least relevant first), both by a stable sort, so units of
equal relevance go in their position order (row-major, earlier first) in BOTH orders.

Modes: ``'deletion'`` starts from ``x`` and replaces units by the fill; ``'insertion'`` starts from the
fill and puts ``x``'s units back. Fills: ``'zeros'``; ``'mean'`` (per row and channel the mean over the
image, per row the mean embedding over the tokens); ``'blur'`` (images: :func:`blur` with its default
sigma); or a tensor that broadcasts to ``x`` (any baseline, e.g. ``blur(x, sigma=3)``).

Step ``k`` (k = 0..S) has ``min(k * units_per_step, U)`` of the U units perturbed, so a curve holds
S + 1 = ceil(U / units_per_step) + 1 values (or ``max_steps`` + 1); value 0 is the unperturbed input
(deletion) or the pure fill (insertion). Every step is ONE forward of the whole batch (both orders of
:func:`faithfulness` stacked in the same forward), without gradients, on ``x``'s device.

The score is the target logit ``f_t`` (``forward(model, x) -> logits``; wrap a softmax into ``forward``
for probabilities). Area under a curve: the trapezoid rule with unit spacing between steps, divided by
the number of steps S, i.e. the curve's mean height,
``A = (1 / S) * sum_{k=1..S} (y_{k-1} + y_k) / 2``. ABPC, the area between the perturbation curves, is
``A(LeRF) - A(MoRF)`` for deletion and ``A(MoRF) - A(LeRF)`` for insertion: positive when the relevance
ranks units by their effect on the score, larger is more faithful.

Quantus 0.6 reports the same curves differently: RegionPerturbation gives ``y_0 - y_k`` for k >= 1,
PixelFlipping ``y_k`` for k >= 1 (with its per-element units: a single-channel image's pixels).
"""
import math
from dataclasses import dataclass

import torch
import torchvision.transforms.functional as TF
from tqdm.auto import tqdm

from ..attribution import logits_of
from .._docstrings import shared_parameters

__all__ = ['UNITS', 'MODES', 'ORDERS', 'FILLS', 'blur', 'unit_relevance', 'perturbation_curve', 'area',
           'Faithfulness', 'faithfulness']

# numpydoc entries (lxt_ext._docstrings) of the arguments the perturbation functions share, written once:
# what is perturbed, and how (lxt_ext.evaluation.compare passes the latter on)
_INPUTS = ('perturbed_model', 'perturbed_input', 'perturbed_relevance', 'perturbed_target')
_OPTIONS = ('perturbation_mode', 'perturbation_unit', 'patch_size', 'perturbation_fill', 'units_per_step', 'max_steps')

UNITS = ('pixel', 'patch', 'token')
MODES = ('deletion', 'insertion')
ORDERS = ('morf', 'lerf')
FILLS = ('zeros', 'mean', 'blur')


def _choice(name, value, choices):
    if value not in choices:
        raise ValueError(f'{name} must be one of {choices}, got {value!r}')


def blur(x, sigma=5.0):
    """Gaussian blur of an image batch (N, C, H, W) with standard deviation ``sigma`` pixels (kernel
    ``2 * ceil(3 sigma) + 1``, cut to fit the image; reflected borders).

    Parameters
    ----------
    x : torch.Tensor
        Images (N, C, H, W).
    sigma : float, optional
        The standard deviation in pixels (default 5).

    Returns
    -------
    torch.Tensor
        The blurred images, shaped like ``x``.
    """
    if x.dim() != 4:
        raise ValueError(f'blur takes an image batch (N, C, H, W), got shape {tuple(x.shape)}')
    size = [min(2 * math.ceil(3 * sigma) + 1, 2 * ((n - 1) // 2) + 1) for n in x.shape[-2:]]
    return TF.gaussian_blur(x, kernel_size=size[::-1], sigma=float(sigma))


def _fill(x, fill, unit):
    if isinstance(fill, torch.Tensor):
        try:
            return torch.broadcast_to(fill.to(device=x.device, dtype=x.dtype), x.shape)
        except RuntimeError:
            raise ValueError(f'the fill tensor of shape {tuple(fill.shape)} does not broadcast to the input '
                             f'{tuple(x.shape)}') from None
    if fill not in FILLS:
        raise ValueError(f'fill must be one of {FILLS} or a tensor that broadcasts to the input, got {fill!r}')
    if fill == 'zeros':
        return torch.zeros_like(x)
    if fill == 'mean':
        return x.mean(dim=1 if unit == 'token' else (2, 3), keepdim=True).expand_as(x)
    if unit == 'token':
        raise ValueError("fill='blur' is for images; give token sequences 'zeros', 'mean' or a baseline tensor")
    return blur(x)


def _check_input(x, unit):
    _choice('unit', unit, UNITS)
    want = 3 if unit == 'token' else 4
    if x.dim() != want:
        raise ValueError(f"unit={unit!r} takes {'embeddings (N, T, D)' if want == 3 else 'images (N, C, H, W)'}, "
                         f'got an input of shape {tuple(x.shape)}')


def unit_relevance(relevance, x_shape, unit='patch', patch_size=16):
    """Relevance per unit (N, U), units in row-major (pixel, patch) or sequence (token) order.

    Parameters
    ----------
    relevance : torch.Tensor
        Shaped like the input, or summed over channels (N, H, W) or embedding dimensions (N, T).
    x_shape : tuple of int
        The input's shape, (N, C, H, W) or (N, T, D).
    unit : {'pixel', 'patch', 'token'}, optional
        The unit (default ``'patch'``).
    patch_size : int, optional
        The side of a square patch in pixels (default 16).

    Returns
    -------
    torch.Tensor
        (N, U): each unit's relevance, summed over its elements.
    """
    relevance = torch.as_tensor(relevance)
    n = x_shape[0]
    if unit == 'token':
        if relevance.shape == tuple(x_shape):
            relevance = relevance.sum(-1)
        if relevance.shape != tuple(x_shape[:2]):
            raise ValueError(f'token relevance must be shaped like the input {tuple(x_shape)} or (N, T) = '
                             f'{tuple(x_shape[:2])}, got {tuple(relevance.shape)}')
    else:
        if relevance.dim() == 4:
            relevance = relevance.sum(1)
        if relevance.shape != (n, *x_shape[2:]):
            raise ValueError(f'image relevance must be (N, C, H, W) or (N, H, W) for the input {tuple(x_shape)}, '
                             f'got {tuple(relevance.shape)}')
    if not torch.isfinite(relevance).all():
        raise ValueError('the relevance holds NaN or Inf')
    if unit == 'patch':
        if patch_size < 1:
            raise ValueError(f'patch_size must be positive, got {patch_size}')
        top, left = _grid_offset(relevance.shape[-2:], patch_size)
        h, w = relevance.shape[-2:]
        padded = torch.nn.functional.pad(relevance, (left, -(w + left) % patch_size, top, -(h + top) % patch_size))
        relevance = torch.nn.functional.avg_pool2d(padded[:, None], patch_size, divisor_override=1)[:, 0]
    return relevance.reshape(n, -1)


def _grid_offset(size, patch_size):
    """Rows and columns of padding before the image in the centred patch grid (Quantus's split)."""
    return tuple((-n % patch_size) // 2 for n in size)


def _spread(unit_mask, x_shape, unit, patch_size):
    """A (rows, U) mask of units as a mask broadcastable to the input (rows, 1, H, W) / (rows, T, 1)."""
    rows = unit_mask.shape[0]
    if unit == 'token':
        return unit_mask[:, :, None]
    h, w = x_shape[2:]
    if unit == 'pixel':
        return unit_mask.view(rows, 1, h, w)
    top, left = _grid_offset((h, w), patch_size)
    grid = unit_mask.view(rows, 1, math.ceil((h + top) / patch_size), math.ceil((w + left) / patch_size))
    return grid.repeat_interleave(patch_size, 2).repeat_interleave(patch_size, 3)[..., top:top + h, left:left + w]


def _curves(model, x, relevance, target, orders, mode, unit, patch_size, fill, units_per_step, max_steps,
            forward, progress):
    """Curves (len(orders), N, S + 1): all orders' rows stacked into one forward per step."""
    _check_input(x, unit)
    _choice('mode', mode, MODES)
    for order in orders:
        _choice('order', order, ORDERS)
    if units_per_step < 1:
        raise ValueError(f'units_per_step must be positive, got {units_per_step}')
    n = x.shape[0]
    target = torch.as_tensor(target, device=x.device)
    if target.dim() == 0:
        target = target.expand(n)
    if target.shape != (n,) or target.is_floating_point():
        raise ValueError(f'target must be an int or an integer tensor of shape ({n},), got {target.dtype} '
                         f'of shape {tuple(target.shape)}')
    scores = unit_relevance(relevance, x.shape, unit, patch_size).to(x.device)
    units = scores.shape[1]
    ranks = []
    for order in orders:
        ranking = torch.sort(scores, dim=1, descending=order == 'morf', stable=True).indices
        rank = torch.empty_like(ranking)
        rank.scatter_(1, ranking, torch.arange(units, device=x.device).expand(n, units))
        ranks.append(rank)
    rank = torch.cat(ranks)
    steps = math.ceil(units / units_per_step)
    if max_steps is not None:
        steps = min(steps, int(max_steps))
    x = x.detach()
    baseline = _fill(x, fill, unit)
    repeats = (len(orders),) + (1,) * (x.dim() - 1)
    x_all, baseline_all = x.repeat(repeats), baseline.repeat(repeats)
    target_all = target.long().repeat(len(orders))
    curve = torch.empty(len(orders) * n, steps + 1, device=x.device, dtype=torch.float64)
    call = forward or (lambda model, inputs: model(inputs))
    with torch.no_grad():
        for k in tqdm(range(steps + 1), desc=f'{mode} by {unit}', disable=not progress, leave=False):
            mask = _spread(rank < min(k * units_per_step, units), x.shape, unit, patch_size)
            gone, kept = (baseline_all, x_all) if mode == 'deletion' else (x_all, baseline_all)
            inputs = torch.where(mask, gone, kept)
            logits = logits_of(call(model, inputs))
            curve[:, k] = logits.gather(1, target_all[:, None])[:, 0].double()
    return curve.view(len(orders), n, steps + 1)


@shared_parameters(*_INPUTS, leading=True)
@shared_parameters(*_OPTIONS, 'logits_forward', 'progress')
def perturbation_curve(model, x, relevance, target, order='morf', mode='deletion', unit='patch', patch_size=16,
                       fill='zeros', units_per_step=1, max_steps=None, forward=None, progress=True):
    """The target logit after each step (N, S + 1), float64; see the module doc for every argument.

    Parameters
    ----------
    order : {'morf', 'lerf'}, optional
        Most relevant first (default) or least relevant first.

    Returns
    -------
    torch.Tensor
        (N, S + 1) float64: the target logit before and after each step.
    """
    return _curves(model, x, relevance, target, (order,), mode, unit, patch_size, fill, units_per_step,
                   max_steps, forward, progress)[0]


def area(curve):
    """Trapezoid area under curves (..., S + 1) with unit step spacing, divided by S (the mean height).

    Parameters
    ----------
    curve : torch.Tensor
        Curves (..., S + 1), at least two points each.

    Returns
    -------
    torch.Tensor
        (...): each curve's area.
    """
    if curve.shape[-1] < 2:
        raise ValueError('a curve needs at least two points (one perturbation step) for an area')
    return torch.trapezoid(curve, dim=-1) / (curve.shape[-1] - 1)


@dataclass
class Faithfulness:
    """MoRF and LeRF curves (N, S + 1), their areas and ABPC (N,) of one mode.

    Parameters
    ----------
    mode : {'deletion', 'insertion'}
        The mode the curves were recorded in (decides the sign of ``abpc``).
    morf : torch.Tensor
        The most-relevant-first curves (N, S + 1).
    lerf : torch.Tensor
        The least-relevant-first curves (N, S + 1).
    """
    mode: str
    morf: torch.Tensor
    lerf: torch.Tensor

    @property
    def morf_area(self):
        return area(self.morf)

    @property
    def lerf_area(self):
        return area(self.lerf)

    @property
    def abpc(self):
        """Area between the perturbation curves, signed so that larger is more faithful."""
        between = self.lerf_area - self.morf_area
        return between if self.mode == 'deletion' else -between


@shared_parameters(*_INPUTS, *_OPTIONS, 'logits_forward', 'progress')
def faithfulness(model, x, relevance, target, mode='deletion', unit='patch', patch_size=16, fill='zeros',
                 units_per_step=1, max_steps=None, forward=None, progress=True):
    """MoRF and LeRF curves of one ``mode`` in one pass (one forward of 2N rows per step).

    Returns
    -------
    Faithfulness
        Both curves, their areas (``morf_area``, ``lerf_area``) and ``abpc`` per row.
    """
    morf, lerf = _curves(model, x, relevance, target, ORDERS, mode, unit, patch_size, fill, units_per_step,
                         max_steps, forward, progress)
    return Faithfulness(mode, morf, lerf)
