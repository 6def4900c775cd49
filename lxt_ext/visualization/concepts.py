"""The pictures of ``lxt-ext concepts`` (:func:`lxt_ext.concepts.ground_truth.ground_truth`'s results): the demo
samples with their class heatmaps and the conditional heatmaps of each class's most relevant units, and the
reference sheets of units, objects outlined."""

__all__ = ['SCALE', 'SHOWN', 'heatmap_figure', 'reference_sheet']

SCALE = 2                  # picture cells are the 64 x 64 images enlarged twice (nearest neighbour)
SHOWN = 8                  # references per unit in references.png
OUTLINE = (0.2, 1.0, 0.2)


def _write(draw, xy, text):
    """Black text on the white bands of a picture."""
    draw.text(xy, text, fill='black')


def _cells(rows, size):
    """A PIL image of rows of (H, W, 3) float arrays, enlarged :data:`SCALE` times."""
    import numpy as np
    from PIL import Image

    pixels = (np.concatenate([np.concatenate(row, axis=1) for row in rows], axis=0).clip(0, 1) * 255)
    pixels = pixels.round().astype(np.uint8)
    return Image.fromarray(pixels).resize((pixels.shape[1] * SCALE, pixels.shape[0] * SCALE), Image.NEAREST)


def _unit_caption(results, unit, mode='relevance'):
    labelled = results['labels'][mode]
    return f'unit {unit}: {results["classes"][int(labelled.label[unit])]} {labelled.purity[unit].item():.2f}'


def heatmap_figure(results):
    """The demo samples: image (object outlined), class heatmap, then the conditional heatmaps of the class's
    most relevant units, each captioned with the unit's label and purity (relevance maximisation, top ``k``)
    and its share of the class heatmap's relevance.

    Parameters
    ----------
    results : dict
        :func:`~lxt_ext.concepts.ground_truth.ground_truth`'s results.

    Returns
    -------
    PIL.Image.Image
    """
    import numpy as np
    from PIL import Image, ImageDraw

    from .image import colours, outline as _outline

    demo = results['demo']
    size = demo['images'].shape[-1] * SCALE
    band, header = 26, 30
    columns = 2 + max(len(c) for c in results['chosen'])
    canvas = Image.new('RGB', (columns * size, header + len(demo['names']) * (size + band)), 'white')
    draw = ImageDraw.Draw(canvas)
    titles = ['image (object outlined)', 'class heatmap'] + [f'unit {i + 1} of the class' for i in range(columns - 2)]
    for column, title in enumerate(titles):
        _write(draw, (column * size + 4, 2), title)
    _write(draw, (4, 15), f'{results["layer"]}, labels: majority class of the top {results["k"]} relevance references')
    for i, name in enumerate(demo['names']):
        outline = _outline(demo['masks'][i]).numpy()
        label = int(demo['labels'][i])
        cells = [demo['images'][i].permute(1, 2, 0).numpy().astype(np.float64), colours(demo['unconditional'][i])]
        cells += [colours(h) for h in demo['heatmaps'][i]]
        for cell in cells:
            cell[outline] = OUTLINE
        top = header + i * (size + band)
        canvas.paste(_cells([cells], size), (0, top + band))
        _write(draw, (4, top + 2), f'{name}')
        _write(draw, (4, top + 13), f'class {results["classes"][label]}')
        total = demo['unconditional'][i].sum().item()
        for j, unit in enumerate(results['chosen'][label]):
            share = demo['heatmaps'][i][j].sum().item() / total if total else float('nan')
            _write(draw, ((2 + j) * size + 4, top + 2), _unit_caption(results, unit))
            _write(draw, ((2 + j) * size + 4, top + 13), f'{share:.0%} of the relevance')
    return canvas


def reference_sheet(results, units=None):
    """Reference sheets: per unit its top references (up to :data:`SHOWN`, object outlined) above their
    conditional heatmaps (each image explained for its label through the unit), captioned with the unit's
    label and purity.

    Parameters
    ----------
    results : dict
        :func:`~lxt_ext.concepts.ground_truth.ground_truth`'s results.
    units : list of int, optional
        The units (default each class's most relevant unit, then two of the random units not chosen for a class);
        each needs its heatmaps in ``results['heatmaps']``.

    Returns
    -------
    PIL.Image.Image
    """
    import numpy as np
    from PIL import Image, ImageDraw

    from .image import colours, outline as _outline

    if units is None:
        others = [u for u in results['random_units'] if u not in results['top']]
        units = list(dict.fromkeys([c[0] for c in results['chosen']] + others[:2]))
    chosen_for = {}
    for c, units_of_class in enumerate(results['chosen']):
        for unit in units_of_class:
            chosen_for.setdefault(unit, results['classes'][c])
    images, masks = results['data']['images'], results['data']['masks']
    count = min(SHOWN, results['k'])
    size = images.shape[-1] * SCALE
    band = 16
    canvas = Image.new('RGB', (count * size, len(units) * (2 * size + band)), 'white')
    draw = ImageDraw.Draw(canvas)
    for row, unit in enumerate(units):
        refs = results['references']['relevance'][:count, unit]
        pictures, maps = [], []
        for j, index in enumerate(refs.tolist()):
            outline = _outline(masks[index]).numpy()
            picture = images[index].permute(1, 2, 0).numpy().astype(np.float64)
            heatmap = colours(results['heatmaps'][unit][j])
            picture[outline] = OUTLINE
            heatmap[outline] = OUTLINE
            pictures.append(picture)
            maps.append(heatmap)
        top = row * (2 * size + band)
        why = f'most relevant to {chosen_for[unit]}' if unit in chosen_for else 'random unit'
        shown = ', '.join(results['classes'][int(results['data']['labels'][i])] for i in refs.tolist())
        _write(draw, (4, top + 2), f'{_unit_caption(results, unit)} (purity of the top {results["k"]}; {why}); '
                                  f'reference classes: {shown}')
        canvas.paste(_cells([pictures, maps], size), (0, top + band))
    return canvas
