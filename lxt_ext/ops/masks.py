"""Attention masks as additive float masks, one converter per PyTorch convention of boolean masks.

- ``additive_from_attend``: ``torch.nn.functional.scaled_dot_product_attention``'s (and transformers'):
  ``True`` = attend;
- ``additive_from_masked``: ``torch.nn.MultiheadAttention``'s ``attn_mask`` and ``key_padding_mask``:
  ``True`` = masked.

Float masks are added to the scores in both conventions and pass through as they are.
"""
import torch

__all__ = ['additive_from_attend', 'additive_from_masked']


def _additive(mask, dtype, blocked, fill):
    if mask is None or mask.is_floating_point():
        return mask
    fill = float('-inf') if fill is None else fill
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(blocked(mask), fill)


_PARAMETERS = """

    Parameters
    ----------
    mask : torch.Tensor or None
        A boolean mask in the function's convention, or a float mask (added, kept as it is).
    dtype : torch.dtype
        The additive mask's dtype.
    fill : float, optional
        The score of a position that takes no part (default ``-inf``).

    Returns
    -------
    torch.Tensor or None
    """


def additive_from_attend(mask, dtype, fill=None):
    return _additive(mask, dtype, torch.logical_not, fill)


def additive_from_masked(mask, dtype, fill=None):
    return _additive(mask, dtype, lambda m: m, fill)


# one Parameters section for both conventions
additive_from_attend.__doc__ = "SDPA's convention (bool ``True`` = attend) as an additive mask." + _PARAMETERS
additive_from_masked.__doc__ = "``nn.MultiheadAttention``'s convention (bool ``True`` = masked) as an additive mask." \
    + _PARAMETERS
