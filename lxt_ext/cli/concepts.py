"""``lxt-ext concepts``: neuron labels and their ground truth on the embedded model.

The embedded ViT was trained on procedural shapes (:mod:`lxt_ext.data.shapes`) whose classes and object masks
are known. The command

1. draws held-out images with a seed that training (seeds 0, 1, 2 of ``python/training/train_default_model.py``)
   and the tests never use (default :data:`HELD_OUT_SEED`);
2. finds every unit's reference samples among them: relevance maximisation (each image explained for its
   label) and activation maximisation, zennit-crp's under lxt_ext's transformer composite
   (:class:`~lxt_ext.concepts.TransformerFeatureVisualization`);
3. labels each unit by the majority class of its top ``k`` references, with the share of them carrying it
   (purity, :func:`~lxt_ext.concepts.label_units`);
4. picks for each class the units most relevant to it on the shipped demo samples
   (:func:`~lxt_ext.concepts.most_relevant_units` over the demo samples of that class, explained for it: images
   disjoint from the references) and compares their purity with as many random units (``--draws`` draws, and all
   units) and with ``k`` random images (chance);
5. measures whether a unit's relevance localises on the object: the relevance mass (share of positive relevance
   inside the object mask, ``lxt_ext.evaluation.relevance_mass_accuracy``) of its conditional heatmaps on its
   top ``k`` relevance references (each explained for its label, through that unit alone), against the
   unconditional heatmaps of the same images and the mask's area share (the mass of relevance spread evenly).

Written to the output folder: ``heatmaps.png`` (the demo samples: image, class heatmap, the conditional
heatmaps of the class's most relevant units with their labels and purities), ``references.png`` (reference
sheets: the top references of each class's first unit and of two random units, with their conditional
heatmaps), ``index.html`` (the tables and pictures), ``concepts.json`` (every figure) and zennit-crp's
maximisation files under ``maximization/``. The purity table is printed. Exit status 0, 2 on bad arguments
(or without zennit-crp).
"""
import html
import importlib
import json
import math
import os
import sys

import torch

from .._docstrings import shared_parameters
from ..job.evaluation import TRAINING_SEEDS  # the seeds python/training/train_default_model.py drew from
from ..visualization.concepts import SCALE, SHOWN, heatmap_figure, reference_sheet  # noqa: F401 (SCALE, SHOWN: the pictures' sizes)

HELP = 'label the embedded model\'s units by their reference samples; purity and localisation against ground truth'
HELD_OUT_SEED = 20261207   # training used 0, 1, 2; the tests use 20261202 (test_embedded_model) and the demo samples

EPILOG = f'''layers: neurons:<block> (the MLP's neurons, GELU output), residual:<block> (the block's output),
heads:<block> (attention heads), or a name of lxt_ext.concepts.concept_layers; blocks 0..3, negative from the end.
Default: neurons:3 with ViTGamma (CP-LRP), 1000 held-out images of seed {HELD_OUT_SEED}, k = 20.
Output folder: heatmaps.png, references.png, index.html, concepts.json, maximization/.
Exit status: 0 done, 2 bad arguments (or zennit-crp not installed).'''


@shared_parameters('command_parser')
def add_arguments(parser):
    """Add the arguments of ``lxt-ext concepts``."""
    parser.epilog = EPILOG
    parser.add_argument('--out', default='concepts', help='output folder (default: concepts)')
    parser.add_argument('--images', type=int, default=1000, help='held-out images searched (default 1000)')
    parser.add_argument('--seed', type=int, default=HELD_OUT_SEED,
                        help=f'seed of the held-out images (default {HELD_OUT_SEED}; training used 0, 1, 2)')
    parser.add_argument('--layer', default='neurons:3', help='concept layer (default neurons:3, see below)')
    parser.add_argument('--k', type=int, default=20, help='reference samples per unit (default 20; at most zennit-crp\'s 40)')
    parser.add_argument('--units-per-class', type=int, default=3,
                        help='most relevant units per class (default 3)')
    parser.add_argument('--draws', type=int, default=100,
                        help='draws of random units (and of random references for the chance level; default 100)')
    parser.add_argument('--composite', default='vit_gamma',
                        help='vit_gamma or vit_epsilon, optionally :cp or :attnlrp (default vit_gamma, i.e. CP-LRP)')
    parser.add_argument('--batch-size', type=int, default=50, help='images per backward (default 50)')
    parser.add_argument('--threads', type=int, help='torch CPU threads')


def _error(message):
    print(f'lxt-ext concepts: error: {message}', file=sys.stderr)
    return 2


def _composite_factory(spec):
    """A function building the composite of ``spec`` (``vit_gamma[:cp|:attnlrp]``, ``vit_epsilon[...]``)."""
    from .models import build_composite, load_embedded

    name, _, attention = spec.partition(':')
    if name not in ('vit_gamma', 'vit_epsilon'):
        raise ValueError(f'unknown composite {spec!r}: give vit_gamma or vit_epsilon, optionally with :cp or '
                         f':attnlrp')
    if attention and attention not in ('cp', 'attnlrp'):
        raise ValueError(f'composite {spec!r}: the attention rule must be cp or attnlrp')
    loaded = load_embedded()
    parameters = {'attention': attention or None}
    build_composite(name, loaded, parameters)        # refuses what does not fit before any work

    def make():
        return build_composite(name, loaded, parameters)[0]
    return make


def table(results):
    """The purity table (markdown): top units, random units, all units, random references.

    Parameters
    ----------
    results : dict
        :func:`~lxt_ext.concepts.ground_truth.ground_truth`'s results.

    Returns
    -------
    str
    """
    p, k, n = results['purity'], results['k'], len(results['top'])
    lines = ['| units | count | purity, relevance maximisation | purity, activation maximisation |',
             '|---|---|---|---|',
             f'| most relevant to each class ({len(results["chosen"][0])} per class, on the demo samples) | {n} | '
             f'{p["relevance"]["top"]:.3f} | {p["activation"]["top"]:.3f} |']
    lines.append(f'| random ({results["draws"]} draws of {n}: mean, min..max) | {n} | '
                 + ' | '.join(f'{p[m]["random"]:.3f} ({p[m]["random_low"]:.3f}..{p[m]["random_high"]:.3f})'
                              for m in ('relevance', 'activation')) + ' |')
    lines.append(f'| all units | {results["units"]} | {p["relevance"]["all"]:.3f} | {p["activation"]["all"]:.3f} |')
    lines.append(f'| {k} random images (chance level) | - | {results["chance"]:.3f} | {results["chance"]:.3f} |')
    return '\n'.join(lines)


def class_table(results):
    """Per class its units with their labels and purities (markdown)."""
    lines = ['| class | units (label, purity: relevance / activation maximisation) | label = class |', '|---|---|---|']
    rel, act = results['labels']['relevance'], results['labels']['activation']
    for c, units in enumerate(results['chosen']):
        cells = [f'{u} ({results["classes"][int(rel.label[u])]} {rel.purity[u]:.2f} / '
                 f'{results["classes"][int(act.label[u])]} {act.purity[u]:.2f})' for u in units]
        agree = sum(int(rel.label[u]) == c for u in units)
        lines.append(f'| {results["classes"][c]} | {", ".join(cells)} | {agree}/{len(units)} |')
    return '\n'.join(lines)


def mass_table(results):
    """The relevance mass (markdown): conditional vs unconditional heatmaps vs the mask's area share."""
    lines = ['| units | conditional heatmap | unconditional heatmap | mask area (chance) |', '|---|---|---|---|']
    for group, values in results['relevance_mass'].items():
        count = len(results['top'] if group == 'top' else results['random_units'])
        lines.append(f'| {group} ({count} units x {results["k"]} references) | {values["conditional"]:.3f} | '
                     f'{values["unconditional"]:.3f} | {values["area"]:.3f} |')
    demo = results['demo']['first_unit_mass']
    lines.append(f'| demo samples, their class\'s first unit ({len(demo["area"])} images) | '
                 f'{demo["conditional"].nanmean():.3f} | {demo["unconditional"].nanmean():.3f} | '
                 f'{demo["area"].mean():.3f} |')
    return '\n'.join(lines)


def summary(results):
    """One paragraph: what was searched, with which settings."""
    return (f'{results["images"]} held-out images (seed {results["seed"]}), layer {results["layer"]} '
            f'({results["units"]} units), composite {results["composite"]}, k = {results["k"]} references per unit; '
            f'purity = share of a unit\'s top {results["k"]} references carrying its majority class; relevance '
            f'mass = share of positive relevance inside the object mask, on the units\' top {results["k"]} '
            f'relevance references')


def _html_table(markdown):
    rows = [line.strip('|').split(' | ') for line in markdown.splitlines() if not line.startswith('|---')]
    head, body = rows[0], rows[1:]
    cells = ''.join(f'<th>{html.escape(c.strip())}</th>' for c in head)
    out = [f'<table><tr>{cells}</tr>']
    for row in body:
        out.append('<tr>' + ''.join(f'<td>{html.escape(c.strip())}</td>' for c in row) + '</tr>')
    return '\n'.join(out) + '</table>'


def page(results):
    """The HTML page: the settings, the tables and the two pictures."""
    style = ('body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;'
             'margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}img{max-width:100%}')
    return f'''<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>lxt-ext concepts: {html.escape(results["layer"])}</title>
<style>{style}</style></head><body>
<h1>Neuron labels of the embedded model</h1>
<p>{html.escape(summary(results))}.</p>
<h2>Purity: the units most relevant to each class vs random units</h2>
{_html_table(table(results))}
{_html_table(class_table(results))}
<h2>Relevance mass: does a unit's relevance lie on the object?</h2>
{_html_table(mass_table(results))}
<h2>Conditional heatmaps on the demo samples</h2>
<img src="heatmaps.png" alt="conditional heatmaps of the most relevant units">
<h2>Reference samples</h2>
<img src="references.png" alt="reference samples and their conditional heatmaps">
</body></html>
'''


def to_json(results):
    """The figures of ``results`` as JSON-serialisable data (a relevance mass that is NaN, a heatmap without
    positive relevance, is None)."""
    rel, act = results['labels']['relevance'], results['labels']['activation']
    return dict(
        layer=results['layer'], units=results['units'], images=results['images'], seed=results['seed'],
        composite=results['composite'], k=results['k'], draws=results['draws'], classes=list(results['classes']),
        chosen=results['chosen'], top=results['top'], random_units=results['random_units'], purity=results['purity'],
        chance=results['chance'], relevance_mass=results['relevance_mass'],
        unit_labels={mode: dict(label=lab.label.tolist(), purity=lab.purity.tolist())
                     for mode, lab in (('relevance', rel), ('activation', act))},
        references={mode: r.tolist() for mode, r in results['references'].items()},
        unit_mass={str(u): {key: [v if math.isfinite(v) else None for v in value.tolist()] for key, value in m.items()}
                   for u, m in results['mass'].items()})


@shared_parameters('command_args')
def run(args):
    """Run ``lxt-ext concepts``: the experiment of the module doc on held-out images, its pictures, page and
    figures.

    Returns
    -------
    int
        The exit status: 0, or 2 on bad arguments.
    """
    import time

    from ..data import shapes

    start = time.perf_counter()
    if args.threads is not None:
        if args.threads < 1:
            return _error(f'--threads must be at least 1, got {args.threads}')
        torch.set_num_threads(args.threads)
    if args.images < 1:
        return _error(f'--images must be at least 1, got {args.images}')
    if args.seed in TRAINING_SEEDS:
        return _error(f'--seed {args.seed} drew the embedded model\'s training data (seeds {TRAINING_SEEDS}); '
                      f'choose another (default {HELD_OUT_SEED})')
    try:
        importlib.import_module('lxt_ext.concepts')        # zennit-crp installed?
    except ImportError as error:
        return _error(f'lxt-ext concepts needs zennit-crp (pip install --no-deps -r requirements-crp.txt): {error}')
    from ..concepts.ground_truth import MAX_K, ground_truth

    if not 1 <= args.k <= min(MAX_K, args.images):
        return _error(f'--k must be in 1..{min(MAX_K, args.images)} (zennit-crp keeps {MAX_K} references per unit, '
                      f'and at most --images), got {args.k}')
    for flag, value in (('--units-per-class', args.units_per_class), ('--draws', args.draws),
                        ('--batch-size', args.batch_size)):
        if value < 1:
            return _error(f'{flag} must be at least 1, got {value}')
    try:
        make_composite = _composite_factory(args.composite)
        from ..concepts import concept_layers, resolve_layer
        from ..data import embedded
        resolve_layer(args.layer, concept_layers(embedded.load_model()))
    except ValueError as error:
        return _error(str(error))
    images, masks, labels = shapes.generate(args.images, seed=args.seed)
    os.makedirs(args.out, exist_ok=True)
    try:
        results = ground_truth(images, masks, labels, make_composite, args.layer, args.k, args.units_per_class,
                               args.draws, args.composite, args.batch_size, os.path.join(args.out, 'maximization'),
                               held_out_seed=args.seed)
    except ValueError as error:
        return _error(str(error))
    heatmap_figure(results).save(os.path.join(args.out, 'heatmaps.png'))
    reference_sheet(results).save(os.path.join(args.out, 'references.png'))
    with open(os.path.join(args.out, 'index.html'), 'w') as file:
        file.write(page(results))
    data = to_json(results)
    data['wall_s'] = time.perf_counter() - start
    with open(os.path.join(args.out, 'concepts.json'), 'w') as file:
        json.dump(data, file, indent=1)
    print(f'{summary(results)}\n\n{table(results)}\n\n{class_table(results)}\n\n{mass_table(results)}\n\n'
          f'wall time {data["wall_s"]:.0f} s; wrote {os.path.join(args.out, "index.html")}, heatmaps.png, '
          f'references.png, concepts.json')
    return 0
