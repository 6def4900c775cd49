"""Relevance of an image as a heatmap PNG, coloured with zennit's colour maps.

Why not ``zennit.image.imgify``: it makes a palette image and passes ``putpalette`` zennit's palette,
a (256, 3) NumPy array; Pillow 13 keeps that as given and, on ``save``, reads it with
``array.array('B', palette)``, which takes each row for one integer and raises "only integer scalar
arrays can be converted to a scalar index" (zennit 0.5.1 and 1.0.0 alike; Pillow 12.3 still saves).
Here the colour map is applied to the values directly and the RGB image made from a uint8 array.
"""
import numpy as np
from zennit.image import CMAPS

DEFAULT_CMAP = 'coldnhot'


def normalise(relevance):
    """``(H, W)`` values in 0..1, symmetric around 0.5: ``(R / max|R| + 1) / 2`` of the channel sum.

    ``relevance`` is (H, W) or (C, H, W) with C = 1 or 3 (a tensor or anything NumPy converts); the
    channels are summed, so 0.5 is zero relevance, 1 the most positive and 0 its negative. All-zero
    relevance maps to 0.5 everywhere.
    """
    array = np.asarray(relevance.detach().cpu() if hasattr(relevance, 'detach') else relevance, dtype=np.float64)
    if array.ndim == 3 and array.shape[0] in (1, 3):
        array = array.sum(0)
    elif array.ndim != 2:
        raise ValueError(f'relevance must be (H, W) or (1|3, H, W), got shape {tuple(array.shape)}')
    return (array / max(np.abs(array).max(), 1e-30) + 1) / 2


def colours(relevance, cmap=DEFAULT_CMAP):
    """``(H, W, 3)`` float RGB in 0..1: zennit's colour map ``cmap`` (a name in ``zennit.image.CMAPS``)
    at :func:`normalise` ``(relevance)``; for 'coldnhot', positive relevance is hot (red to white),
    negative cold (blue to cyan), zero black."""
    if cmap not in CMAPS:
        raise ValueError(f'unknown colour map {cmap!r}; zennit.image.CMAPS has {sorted(CMAPS)}')
    return CMAPS[cmap](normalise(relevance))


def to_pil(rgb):
    """A PIL RGB image of ``(H, W, 3)`` floats in 0..1, rounded to the nearest of 256 levels."""
    from PIL import Image

    return Image.fromarray((np.clip(rgb, 0, 1) * 255).round().astype(np.uint8))


def imgify(relevance, cmap=DEFAULT_CMAP):
    """The heatmap of ``relevance`` ((H, W) or (1|3, H, W)) as a PIL RGB image, H x W pixels.

    Like ``zennit.image.imgify(relevance.sum(0), symmetric=True, cmap=cmap)``, except that the colour
    map is evaluated at each value (not at 256 palette levels) and the result saves with any Pillow.

    Parameters
    ----------
    relevance : torch.Tensor or array_like
        (H, W), or (1, H, W) / (3, H, W) summed over channels.
    cmap : str, optional
        A colour map of ``zennit.image.CMAPS`` (default ``'coldnhot'``).

    Returns
    -------
    PIL.Image.Image
        An RGB image, H x W pixels.
    """
    return to_pil(colours(relevance, cmap))


def overlaid(relevance, image, cmap=DEFAULT_CMAP):
    """``(H, W, 3)`` RGB: the heatmap laid over ``image`` ((3, H, W) in 0..1), each pixel's colour mixed
    in by its share of the largest |relevance|, so irrelevant pixels show the image unchanged."""
    heat = colours(relevance, cmap)
    pixels = _pixels(image, heat.shape[:2]).transpose(1, 2, 0)
    alpha = np.abs(normalise(relevance) * 2 - 1)[..., None]
    return (1 - alpha) * pixels + alpha * heat


def _pixels(image, size):
    pixels = np.asarray(image.detach().float().cpu() if hasattr(image, 'detach') else image, dtype=np.float64)
    if pixels.shape != (3,) + tuple(size):
        raise ValueError(f'image must be (3, H, W) = {(3,) + tuple(size)} like the relevance, '
                         f'got {tuple(pixels.shape)}')
    return pixels


def save_heatmap(relevance, path, image=None, cmap=DEFAULT_CMAP, overlay=False, format=None, compress_level=None):
    """Write :func:`imgify` ``(relevance)`` to ``path`` (a file name, format from its suffix, or a binary
    file object with ``format``, e.g. ``'PNG'``). ``compress_level``: the PNG's zlib level (0-9; Pillow's
    default 6 when None; 1 encodes several times faster into a somewhat larger file).

    With ``image`` (the input, (3, H, W) in 0..1, the relevance's H x W), the PNG is 2W wide: the image
    on the left, the heatmap on the right; with ``overlay=True`` it is the heatmap over the image
    (:func:`overlaid`), W wide.

    Parameters
    ----------
    relevance : torch.Tensor or array_like
        (H, W), or (1, H, W) / (3, H, W) summed over channels.
    path : str or file object
        The file to write (its suffix gives the format), or a binary file object with ``format``.
    image : torch.Tensor, optional
        The input (3, H, W) in 0..1: shown beside the heatmap, or under it with ``overlay``.
    cmap : str, optional
        A colour map of ``zennit.image.CMAPS`` (default ``'coldnhot'``).
    overlay : bool, optional
        Lay the heatmap over ``image`` instead of beside it (default False).
    format : str, optional
        The image format for a file object, e.g. ``'PNG'``.
    compress_level : int, optional
        The PNG's zlib level, 0-9 (Pillow's default 6 when None).
    """
    if overlay:
        if image is None:
            raise ValueError('overlay=True needs the image')
        heat = overlaid(relevance, image, cmap)
    else:
        heat = colours(relevance, cmap)
        if image is not None:
            heat = np.concatenate([_pixels(image, heat.shape[:2]).transpose(1, 2, 0), heat], axis=1)
    options = {} if compress_level is None else {'compress_level': int(compress_level)}
    to_pil(heat).save(path, format=format, **options)


def outline(mask):
    """The outline of a mask: its pixels with a 4-neighbour outside it.

    Parameters
    ----------
    mask : torch.Tensor
        (H, W) bool.

    Returns
    -------
    torch.Tensor
        (H, W) bool.
    """
    import torch

    padded = torch.nn.functional.pad(mask[None, None].float(), (1, 1, 1, 1))[0, 0]
    inner = padded[:-2, 1:-1].bool() & padded[2:, 1:-1].bool() & padded[1:-1, :-2].bool() & padded[1:-1, 2:].bool()
    return mask & ~inner
