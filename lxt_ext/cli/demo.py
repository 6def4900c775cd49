"""``lxt-ext demo``: the embedded default model end to end on its shipped samples.

Each sample is explained for its labelled class by every method of :data:`METHODS` (lxt_ext's ViT
composites and two gradient baselines), one forward and one backward per method for the whole batch.
Written to the output folder:

- ``grid.png``: one row per sample; the image (the object's outline in green, the distractor bar
  elsewhere), then one heatmap per method (zennit's ``coldnhot``: positive relevance hot, negative
  cold, each map scaled to its own largest |relevance|) with the object's outline;
- ``scores.md`` and ``scores.json``: per method the mean relevance mass accuracy (the share of positive
  relevance on the object) and the pointing-game hit rate over the samples
  (``lxt_ext.evaluation``); the JSON also holds the per-sample values and predictions.

The table is printed too. Exit status 0.
"""
import json
import os

import torch

from .._docstrings import shared_parameters

HELP = 'explain the embedded model\'s sample images with each method: heatmap grid and localisation scores'
SCALE = 3          # grid cells are the 64 x 64 images enlarged 3 times (nearest neighbour)
OUTLINE = (0.2, 1.0, 0.2)


# label -> method spec of lxt_ext.cli.methods (as lxt-ext evaluate --methods spells it)
COMPOSITES = {
    'ViTEpsilon AttnLRP': 'vit_epsilon:attnlrp',
    'ViTEpsilon CP-LRP': 'vit_epsilon:cp',
    'ViTGamma CP-LRP': 'vit_gamma:cp',
    'ViTGamma AttnLRP': 'vit_gamma:attnlrp',
}
BASELINES = {
    'gradient': 'gradient',
    'gradient x input': 'gradient_x_input',
}
METHODS = {**COMPOSITES, **BASELINES}


@shared_parameters('command_parser')
def add_arguments(parser):
    """Add the arguments of ``lxt-ext demo``."""
    parser.add_argument('--out', default='demo', help='output folder (default: demo)')
    parser.add_argument('--threads', type=int, help='torch CPU threads')


def scores(loaded, images, masks, labels):
    """Every method of :data:`METHODS` on the images, with its localisation scores.

    Parameters
    ----------
    loaded : lxt_ext.cli.models.LoadedModel
        The embedded model (:func:`lxt_ext.cli.models.load_embedded`).
    images : torch.Tensor
        (N, 3, H, W) in 0..1, not normalised.
    masks : torch.Tensor
        (N, H, W) bool, True on the object.
    labels : torch.Tensor
        (N,) the classes to explain.

    Returns
    -------
    results : dict
        ``{label: {'relevance': (N, 3, H, W), 'rma': (N,), 'pointing': (N,)}}`` in the order of
        :data:`METHODS`: relevance mass accuracy and pointing-game hits per image.
    predicted : torch.Tensor
        (N,) the model's top classes.
    """
    from ..evaluation import pointing_game, relevance_mass_accuracy
    from .methods import build

    x = loaded.normalise(images)
    with torch.no_grad():
        predicted = loaded.model(x).argmax(1)
    methods = build(METHODS.values(), loaded)
    results = {}
    for label, spec in METHODS.items():
        relevance = methods[spec](loaded.model, x, labels).detach()
        results[label] = dict(relevance=relevance, rma=relevance_mass_accuracy(relevance, masks),
                              pointing=pointing_game(relevance, masks))
    return results, predicted


def grid(images, masks, results):
    """The heatmap grid: a header row of method names, then one row per sample.

    Parameters
    ----------
    images : torch.Tensor
        (N, 3, H, W) in 0..1.
    masks : torch.Tensor
        (N, H, W) bool; each object's outline is drawn on its row.
    results : dict
        :func:`scores`' results, one column per method in their order.

    Returns
    -------
    PIL.Image.Image
        The grid, each cell the image or heatmap enlarged :data:`SCALE` times.
    """
    import numpy as np
    from PIL import Image, ImageDraw

    from ..visualization.image import colours, outline as mask_outline

    rows = []
    for index, (image, mask) in enumerate(zip(images, masks)):
        outline = mask_outline(mask).numpy()
        cells = [image.permute(1, 2, 0).numpy().astype(np.float64)]
        cells += [colours(result['relevance'][index]) for result in results.values()]
        for cell in cells:
            cell[outline] = OUTLINE
        rows.append(np.concatenate(cells, axis=1))
    pixels = (np.concatenate(rows, axis=0).clip(0, 1) * 255).round().astype(np.uint8)
    size = images.shape[-1] * SCALE
    body = Image.fromarray(pixels).resize((pixels.shape[1] * SCALE, pixels.shape[0] * SCALE), Image.NEAREST)
    header = 16
    canvas = Image.new('RGB', (body.width, body.height + header), 'white')
    canvas.paste(body, (0, header))
    draw = ImageDraw.Draw(canvas)
    for column, label in enumerate(['image (object outlined)'] + list(results)):
        draw.text((column * size + 4, 2), label, fill='black')
    return canvas


def table(results):
    """The scores as a markdown table.

    Parameters
    ----------
    results : dict
        :func:`scores`' results.

    Returns
    -------
    str
        One row per method: mean relevance mass accuracy, pointing-game hit rate.
    """
    lines = ['| method | relevance mass accuracy (mean) | pointing game (hit rate) |', '|---|---|---|']
    for name, result in results.items():
        lines.append(f'| {name} | {result["rma"].nanmean().item():.3f} | {result["pointing"].mean().item():.3f} |')
    return '\n'.join(lines)


@shared_parameters('command_args')
def run(args):
    """Run ``lxt-ext demo``: explain the shipped samples with every method, write the grid and the scores.

    Returns
    -------
    int
        The exit status, 0.
    """
    from ..data import embedded
    from .models import load_embedded

    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_embedded()
    images, masks, labels, names = embedded.load_samples()
    results, predicted = scores(loaded, images, masks, labels)
    os.makedirs(args.out, exist_ok=True)
    grid(images, masks, results).save(os.path.join(args.out, 'grid.png'))
    text = table(results)
    correct = int((predicted == labels).sum())
    summary = (f'{len(names)} samples of the embedded model ({correct} classified correctly), each explained for '
               f'its labelled class; relevance mass accuracy = share of positive relevance on the object')
    with open(os.path.join(args.out, 'scores.md'), 'w') as file:
        file.write(f'{summary}\n\n{text}\n')
    with open(os.path.join(args.out, 'scores.json'), 'w') as file:
        json.dump(dict(
            samples=names, labels=[embedded.CLASSES[k] for k in labels],
            predicted=[embedded.CLASSES[k] for k in predicted],
            methods={name: dict(relevance_mass_accuracy=result['rma'].tolist(),
                                pointing_game=result['pointing'].tolist(),
                                mean_relevance_mass_accuracy=result['rma'].nanmean().item(),
                                pointing_game_hit_rate=result['pointing'].mean().item())
                     for name, result in results.items()}), file, indent=1)
    print(f'{summary}\n\n{text}\n\nwrote {os.path.join(args.out, "grid.png")}, scores.md and scores.json')
    return 0
