"""Seeded procedural images for lxt_ext's embedded default model (``lxt_ext.data.embedded``).

Each 64 x 64 RGB image holds one object of a class, a distractor and a textured background:

- the object: one of :data:`CLASSES`, drawn at a random position and size (half-extent 11-16 px),
  turned by a random quarter turn, in a random bright colour; its
  ground-truth mask is the set of pixels whose centre lies inside the shape;
- the distractor: a bar (a long thin rectangle, class-agnostic) of random length, rotation and
  bright colour, half the time the object's own colour, never overlapping the object;
- the background: a darker, duller random base colour, two coloured sine gratings of random
  frequency and orientation, smooth low-frequency blotches and pixel noise.

Colour, size and position are drawn independently of the class, and the distractor shares the
object's colour half the time, so only the object's *shape* tells the class: an explanation that
is right for the right reasons puts its relevance on the object, not on the bar or the texture.

Shapes are rendered from signed distances ``d`` (negative inside) with one pixel of anti-aliasing:
coverage ``clamp(0.5 - d, 0, 1)``; the mask is ``d <= 0`` at pixel centres.

``python -m lxt_ext.data.shapes OUT_DIR`` writes a few examples as PNGs to look at;
``python/training/train_default_model.py`` trains the embedded model on these images.

Examples
--------
>>> from lxt_ext.data import shapes
>>> images, masks, labels = shapes.generate(4, seed=0)
>>> tuple(images.shape), tuple(masks.shape), tuple(labels.shape)
((4, 3, 64, 64), (4, 64, 64), (4,))
>>> shapes.CLASSES
('disk', 'square', 'triangle', 'cross', 'ring')
"""
import math

import torch

__all__ = ['CLASSES', 'IMAGE_SIZE', 'generate', 'shape_distance', 'to_png']

#: The class names, in label order (``labels`` of :func:`generate` index into this tuple).
CLASSES = ('disk', 'square', 'triangle', 'cross', 'ring')
#: The default image side in pixels (the embedded model's input size).
IMAGE_SIZE = 64
OBJECT_RADIUS = (11.0, 16.0)     # half-extent of the class object, pixels
BAR_HALF_LENGTH = (7.0, 11.0)
BAR_HALF_WIDTH = (1.2, 2.2)
BACKGROUND_VALUE = (0.15, 0.45)  # HSV value: the background is darker than every object and bar
OBJECT_VALUE = (0.8, 1.0)


def _box(u, v, half_u, half_v):
    """Signed distance to an axis-aligned rectangle of half-sides ``half_u``, ``half_v``."""
    qu, qv = u.abs() - half_u, v.abs() - half_v
    outside = torch.sqrt(qu.clamp(min=0) ** 2 + qv.clamp(min=0) ** 2)
    return outside + torch.maximum(qu, qv).clamp(max=0)


def _triangle(u, v, radius):
    """Signed distance (exact inside and along the edges) to an equilateral triangle of
    circumradius ``radius``: the largest of the three edge half-plane distances."""
    inradius = radius / 2
    edges = [u * math.cos(a) + v * math.sin(a) - inradius for a in (math.pi / 2, 7 * math.pi / 6, 11 * math.pi / 6)]
    return torch.stack(edges).amax(0)


def shape_distance(kind, u, v, radius):
    """Signed distance to the shape of one class, in the shape's own coordinates.

    The shapes are scaled so that their areas are similar at the same ``radius``, which keeps size from
    telling the classes apart.

    Parameters
    ----------
    kind : int
        The class, an index into :data:`CLASSES`.
    u, v : torch.Tensor
        Local coordinates of the points (centred on the shape, unrotated), of one shape.
    radius : float or torch.Tensor
        The shape's half-extent in pixels, broadcastable against ``u``.

    Returns
    -------
    torch.Tensor
        The signed distance at each point, negative inside the shape, the shape of ``u``.

    Raises
    ------
    ValueError
        If ``kind`` is not an index into :data:`CLASSES`.
    """
    # Checked first: a negative index would silently pick a class from the end of the tuple.
    if not 0 <= kind < len(CLASSES):
        raise ValueError(f'unknown shape index {kind}: the classes are 0..{len(CLASSES) - 1} ({", ".join(CLASSES)})')
    name = CLASSES[kind]
    if name == 'disk':
        return torch.sqrt(u ** 2 + v ** 2) - radius * 0.85
    if name == 'square':
        return _box(u, v, radius * 0.75, radius * 0.75)
    if name == 'triangle':
        return _triangle(u, v, radius * 1.1)
    if name == 'cross':
        return torch.minimum(_box(u, v, radius, radius * 0.32), _box(u, v, radius * 0.32, radius))
    if name == 'ring':
        return (torch.sqrt(u ** 2 + v ** 2) - radius * 0.72).abs() - radius * 0.28
    raise AssertionError(f'CLASSES names {name!r}, which has no distance function here')


def _hsv_to_rgb(h, s, v):
    """(N,) hue, saturation, value in 0..1 -> (N, 3) RGB."""
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], 1)
    return v[:, None] - (v * s)[:, None] * (torch.minimum(k, 4 - k).clamp(0, 1))


def _uniform(generator, n, low, high):
    return low + (high - low) * torch.rand(n, generator=generator)


def _local(ys, xs, centre, angle):
    """Pixel coordinates relative to ``centre`` (N, 2: y, x), rotated by ``-angle`` (N,): (N, H, W) each."""
    dy, dx = ys - centre[:, 0, None, None], xs - centre[:, 1, None, None]
    cos, sin = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    return cos * dx + sin * dy, -sin * dx + cos * dy


def _placements(generator, n, size, tries=32):
    """Object centres, radii and distractor centres, half-lengths: the distractor's bounding circle
    stays two pixels clear of the object's (rejection sampling: the first of ``tries`` candidate
    pairs that fits; images where none fits draw again)."""
    radius = _uniform(generator, n, *OBJECT_RADIUS)
    half_length = _uniform(generator, n, *BAR_HALF_LENGTH)
    centre = torch.empty(n, 2)
    bar_centre = torch.empty(n, 2)
    todo = torch.arange(n)
    while len(todo):
        r, h = radius[todo, None, None], half_length[todo, None, None]
        c = r + 1 + torch.rand(len(todo), tries, 2, generator=generator) * (size - 3 - 2 * r)
        b = h + 1 + torch.rand(len(todo), tries, 2, generator=generator) * (size - 3 - 2 * h)
        fits = torch.linalg.vector_norm(c - b, dim=2) > r[:, :, 0] + h[:, :, 0] + 2
        found = fits.any(1)
        first = fits.to(torch.uint8).argmax(1)
        rows = torch.arange(len(todo))
        centre[todo[found]] = c[rows, first][found]
        bar_centre[todo[found]] = b[rows, first][found]
        todo = todo[~found]
    return centre, radius, bar_centre, half_length


def _background(generator, n, size, ys, xs):
    base = _hsv_to_rgb(torch.rand(n, generator=generator), _uniform(generator, n, 0.0, 0.4),
                       _uniform(generator, n, *BACKGROUND_VALUE))
    image = base[:, :, None, None].expand(n, 3, size, size).clone()
    for _ in range(2):
        frequency = _uniform(generator, n, 0.08, 0.45)  # radians per pixel
        direction = _uniform(generator, n, 0, math.pi)
        phase = _uniform(generator, n, 0, 2 * math.pi)
        wave = torch.sin(frequency[:, None, None] * (torch.cos(direction)[:, None, None] * xs
                                                     + torch.sin(direction)[:, None, None] * ys) + phase[:, None, None])
        amplitude = _uniform(generator, n, 0.03, 0.12)[:, None] * (torch.rand(n, 3, generator=generator) * 2 - 1)
        image += amplitude[:, :, None, None] * wave[:, None]
    blotches = torch.nn.functional.interpolate(torch.rand(n, 3, 5, 5, generator=generator) * 2 - 1, size=(size, size),
                                               mode='bicubic', align_corners=False)
    return image + 0.12 * blotches


def generate(n, seed, size=IMAGE_SIZE, chunk=1024):
    """Draw ``n`` images of the shapes data set, with their object masks and class labels.

    Everything is drawn from ``torch.Generator().manual_seed(seed)``, so the same arguments give the same
    images on every machine (``python/training/train_default_model.py`` trains on its ``--seed`` and holds out
    ``--seed + 2``).

    Parameters
    ----------
    n : int
        The number of images, at least 1.
    seed : int
        The seed of the random generator all draws come from.
    size : int, optional
        The image side in pixels; the object sizes are in pixels and do not scale with it.
    chunk : int, optional
        How many images are drawn at a time, which bounds the memory; the images depend on it, since the
        draws of a chunk are made together.

    Returns
    -------
    images : torch.Tensor
        ``(n, 3, size, size)`` float32 RGB in 0..1.
    masks : torch.Tensor
        ``(n, size, size)`` bool, True on the class object's pixels.
    labels : torch.Tensor
        ``(n,)`` int64 indices into :data:`CLASSES`, balanced in expectation.

    Raises
    ------
    ValueError
        If ``n`` is smaller than 1.
    """
    if n < 1:
        raise ValueError(f'n must be at least 1, got {n}')
    generator = torch.Generator().manual_seed(seed)
    parts = [_draw(generator, min(chunk, n - start), size) for start in range(0, n, chunk)]
    return tuple(torch.cat(part) for part in zip(*parts))


def _draw(generator, n, size):
    labels = torch.randint(len(CLASSES), (n,), generator=generator)
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing='ij')
    centre, radius, bar_centre, half_length = _placements(generator, n, size)
    image = _background(generator, n, size, ys, xs)

    colour = _hsv_to_rgb(torch.rand(n, generator=generator), _uniform(generator, n, 0.5, 1.0),
                         _uniform(generator, n, *OBJECT_VALUE))
    same = torch.rand(n, generator=generator) < 0.5
    bar_colour = torch.where(same[:, None], colour, _hsv_to_rgb(
        torch.rand(n, generator=generator), _uniform(generator, n, 0.5, 1.0), _uniform(generator, n, *OBJECT_VALUE)))

    quarter_turns = torch.randint(4, (n,), generator=generator) * (math.pi / 2)
    u, v = _local(ys, xs, centre, quarter_turns)
    distance = torch.empty(n, size, size)
    for kind in range(len(CLASSES)):
        rows = labels == kind
        if rows.any():
            distance[rows] = shape_distance(kind, u[rows], v[rows], radius[rows, None, None])
    bu, bv = _local(ys, xs, bar_centre, _uniform(generator, n, 0, math.pi))
    bar_distance = _box(bu, bv, half_length[:, None, None], _uniform(generator, n, *BAR_HALF_WIDTH)[:, None, None])

    for d, c in ((bar_distance, bar_colour), (distance, colour)):
        cover = (0.5 - d).clamp(0, 1)[:, None]
        image = image * (1 - cover) + c[:, :, None, None] * cover
    image = image + 0.03 * torch.randn(image.shape, generator=generator)
    return image.clamp(0, 1), distance <= 0, labels


def to_png(image, path):
    """Write one image or mask of :func:`generate` as a PNG file.

    Parameters
    ----------
    image : torch.Tensor
        A ``(3, H, W)`` float image in 0..1 (clamped, rounded to 8 bits), or an ``(H, W)`` bool mask,
        written black and white (white = True).
    path : str or os.PathLike
        The file to write; its folder must exist.
    """
    from PIL import Image

    if image.dtype == torch.bool:
        array = (image.to(torch.uint8) * 255).numpy()
    else:
        array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    Image.fromarray(array).save(path)


def _main(argv=None):
    import argparse
    import os

    parser = argparse.ArgumentParser(prog='python -m lxt_ext.data.shapes',
                                     description='write example images and masks of the shapes data set')
    parser.add_argument('out', help='output folder')
    parser.add_argument('-n', type=int, default=16, help='how many images')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    images, masks, labels = generate(args.n, args.seed)
    for index, (image, mask, label) in enumerate(zip(images, masks, labels)):
        to_png(image, os.path.join(args.out, f'{index:02d}_{CLASSES[label]}.png'))
        to_png(mask, os.path.join(args.out, f'{index:02d}_{CLASSES[label]}_mask.png'))


if __name__ == '__main__':
    _main()
