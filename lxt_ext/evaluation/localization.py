"""Localisation of relevance against ground-truth object masks, one score per sample.

``relevance`` is (N, H, W), or (N, C, H, W) whose channels are summed first (pixel relevance
``R_p = sum_c R_{c,p}``); ``mask`` is (N, H, W) bool, True on the object (the ground truth ``GT``).

- Relevance mass accuracy (Arras et al. 2022, "CLEVR-XAI", Information Fusion 81): the share of
  the positive relevance that lies on the object,
  ``RMA = sum_{p in GT} max(R_p, 0) / sum_p max(R_p, 0)``, in 0..1 (1: all positive relevance on the
  object). NaN where no pixel has positive relevance (0 / 0). Quantus's ``RelevanceMassAccuracy``
  computes ``sum_{p in GT} R_p / sum_p R_p`` of the relevance as given (its default ``normalise=True``
  divides by ``max |R|``, which cancels), the same number where no relevance is negative.
- Pointing game (Zhang et al. 2018, "Top-down neural attention by excitation backprop", IJCV 126):
  ``1`` where a pixel of maximal relevance ``argmax_p R_p`` lies on the object, else ``0``; ties
  count as a hit if any of the tied pixels is on the object, as in Quantus's ``PointingGame``
  (``weighted=False``), and no tolerance margin around the object.

An empty mask makes either score meaningless: it is an error (Quantus returns NaN with a warning).
"""
import torch

from .._docstrings import shared_parameters

__all__ = ['relevance_mass_accuracy', 'pointing_game']


def _pixels(relevance, mask):
    """``(relevance, mask)`` flattened to (N, H*W): the channel sum, and the mask as bool."""
    if not isinstance(relevance, torch.Tensor) or not isinstance(mask, torch.Tensor):
        raise TypeError(f'relevance and mask must be tensors, got {type(relevance).__name__} and {type(mask).__name__}')
    if relevance.dim() == 4:
        relevance = relevance.sum(1)
    if relevance.dim() != 3 or mask.shape != relevance.shape:
        raise ValueError(f'relevance must be (N, H, W) or (N, C, H, W) and mask (N, H, W) of the same N, H, W; '
                         f'got relevance {tuple(relevance.shape)} and mask {tuple(mask.shape)}')
    if mask.dtype != torch.bool:
        raise TypeError(f'mask must be a bool tensor (True on the object), got {mask.dtype}')
    mask = mask.to(relevance.device).flatten(1)
    empty = (~mask.any(1)).nonzero().flatten()
    if len(empty):
        raise ValueError(f'mask rows {empty.tolist()} are empty: the object must cover at least one pixel')
    return relevance.detach().flatten(1), mask


@shared_parameters('localized_relevance', 'object_mask')
def relevance_mass_accuracy(relevance, mask):
    """(N,) float: the share of each sample's positive relevance inside its mask (module doc).

    Returns
    -------
    torch.Tensor
        (N,) in 0..1; NaN where no pixel has positive relevance.
    """
    relevance, mask = _pixels(relevance, mask)
    positive = relevance.clamp(min=0)
    return (positive * mask).sum(1) / positive.sum(1)


@shared_parameters('localized_relevance', 'object_mask')
def pointing_game(relevance, mask):
    """(N,) float: 1.0 where a pixel of maximal relevance lies inside the mask, else 0.0 (module doc).

    Returns
    -------
    torch.Tensor
        (N,) of 1.0 (hit) and 0.0.
    """
    relevance, mask = _pixels(relevance, mask)
    top = relevance == relevance.amax(1, keepdim=True)
    return (top & mask).any(1).to(relevance.dtype if relevance.is_floating_point() else torch.float32)
