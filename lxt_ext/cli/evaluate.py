"""``lxt-ext evaluate``: compare attribution methods (LRP composites and baselines) on a data set by
perturbation faithfulness and localisation; print a table, write it as markdown and JSON, and a PNG of
the curves and heatmaps. ``--gamma-search`` evaluates a grid of ViTGamma gammas instead."""
import os
import sys

import torch

from .._docstrings import shared_parameters
from . import evaluate_data, evaluate_report
from .methods import BASELINES, DEFAULT_VIT_METHODS, parse

HELP = 'compare attribution methods (LRP composites, baselines) by perturbation faithfulness and localisation'

EPILOG = f'''methods (comma-separated): LRP composites by the names of lxt-ext explain, with :attnlrp or :cp for the
vit_* composites (vit_gamma:cp), and the baselines {", ".join(BASELINES)}.
Default: {",".join(DEFAULT_VIT_METHODS)} for transformers.
Without inputs the embedded model's shipped samples are used with their object masks (relevance mass,
pointing game); other inputs need --masks for those columns. Output folder: evaluation.md, evaluation.json,
evaluation.png (with --gamma-search: gamma_search.md, gamma_search.json, gamma_search.png).
--generate N evaluates on N generated held-out images instead, on the job runner of lxt-ext explain: the same
command resumes a killed run, and torchrun --nproc_per_node=P -m lxt_ext evaluate --generate N ... spreads the
batches over P processes; the report gives 95 % bootstrap intervals and Holm-corrected paired tests.
Exit status: 0 done, 2 bad arguments.'''


@shared_parameters('command_parser')
def add_arguments(parser):
    """Add the arguments of ``lxt-ext evaluate``."""
    from ..evaluation.gamma_search import CONV_GAMMAS, LINEAR_GAMMAS
    from ..evaluation.perturbation import FILLS, MODES, UNITS
    from ..evaluation.protocols import PROTOCOLS
    from ..evaluation.statistics import RESAMPLES
    from ..job.evaluation import DEFAULT_SEED, TRAINING_SEEDS
    from .arguments import add_model_arguments

    parser.epilog = EPILOG
    parser.add_argument('inputs', nargs='*', help='image files, folders, globs or list files (default: the embedded '
                        'samples, with masks)')
    parser.add_argument('--masks', help='folder of object masks (white = object), one PNG per image with the '
                        'image\'s file name stem')
    add_model_arguments(parser, model_help='as in lxt-ext explain (default: embedded)',
                        weights_help='local weights file (torchvision, timm models)')
    parser.add_argument('--methods', help='comma-separated methods (see below; default by model kind)')
    parser.add_argument('--target', help='predicted (each image\'s top class, default), label (the embedded samples\' '
                        'or generated images\' labels; the default with --protocol) or a class index')
    group = parser.add_argument_group('perturbation')
    group.add_argument('--protocol', choices=sorted(PROTOCOLS),
                       help='a paper\'s protocol: sets --mode, --fill, --units-per-step and --target label '
                       '(attnlrp: zeros, 1 patch per step; dynamiclrp: blur, 4 patches per step)')
    group.add_argument('--mode', choices=MODES, help='default: deletion')
    group.add_argument('--unit', choices=[u for u in UNITS if u != 'token'], default='patch')
    group.add_argument('--patch-size', type=int, help='default: the model\'s patch size, else 16')
    group.add_argument('--fill', choices=FILLS, help='on the normalised input (default zeros: the mean colour)')
    group.add_argument('--units-per-step', type=int, help='default: 1')
    group.add_argument('--max-steps', type=int, help='stop after this many steps')
    group = parser.add_argument_group('gamma search')
    group.add_argument('--gamma-search', action='store_true', help='evaluate ViTGamma over a gamma grid instead')
    group.add_argument('--conv-gammas', default=','.join(f'{g:g}' for g in CONV_GAMMAS))
    group.add_argument('--linear-gammas', default=','.join(f'{g:g}' for g in LINEAR_GAMMAS))
    group.add_argument('--attention', choices=('attnlrp', 'cp'), default='cp', help='attention rule of the search')
    group = parser.add_argument_group('at scale (generated held-out images of the embedded model, on the job runner '
                                      'of lxt-ext explain: streamed, resumable, torchrun)')
    group.add_argument('--generate', type=int, metavar='N',
                       help='evaluate on N freshly generated shapes images with their masks instead of inputs')
    group.add_argument('--data-seed', type=int, default=DEFAULT_SEED,
                       help=f'first seed of the generated images (default {DEFAULT_SEED}; the training seeds '
                       f'{", ".join(map(str, TRAINING_SEEDS))} are refused)')
    group.add_argument('--resamples', type=int, default=RESAMPLES,
                       help=f'bootstrap resamples of the intervals and paired tests (default {RESAMPLES})')
    group.add_argument('--no-resume', action='store_true', help='refuse an output folder that holds a run')
    parser.add_argument('--limit', type=int, help='use only the first N images')
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--threads', type=int, help='torch CPU threads')
    parser.add_argument('--out', default='evaluation', help='output folder (default: evaluation)')
    parser.add_argument('--quiet', action='store_true', help='no progress bar')




@shared_parameters('command_args')
def run(args):
    """Run ``lxt-ext evaluate``: load the model, the images and the methods, compare the methods (or
    search the gamma grid), write the outputs and print the table.

    Returns
    -------
    int
        The exit status: 0 done, 2 bad arguments (the message on stderr).
    """
    from ..evaluation.compare import compare, save_plot
    from ..evaluation.gamma_search import gamma_search, save_grid
    from .models import ModelError, fit_warnings, load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    # every bad argument is refused here, before the first image is explained
    try:
        _resolve_protocol(args)
        if args.generate is not None:
            return _run_generated(args)
        loaded = load_model(args.model, args.weights, args.seed)
        images, masks, labels, names = evaluate_data.load(args.inputs, args.masks, args.model, loaded.size,
                                                          args.limit)
        methods = None if args.gamma_search else parse(args.methods, loaded)
        conv_gammas, linear_gammas = _floats(args.conv_gammas), _floats(args.linear_gammas)
        target = _target(args.target, labels)
        if args.gamma_search and not loaded.transformer:
            raise ValueError('--gamma-search tunes ViTGamma, which needs a transformer model')
    except (ModelError, ValueError, FileNotFoundError) as error:
        return _error(str(error))
    fit_warnings(loaded)  # random weights, as explain and check say

    model = loaded.model.to(args.device)
    options = _options(args, loaded, model, masks, target)
    settings = evaluate_report.settings(args, loaded, options, len(names))
    os.makedirs(args.out, exist_ok=True)
    stem = 'gamma_search' if args.gamma_search else 'evaluation'
    plot = os.path.join(args.out, f'{stem}.png')
    try:
        if args.gamma_search:
            search = gamma_search(model, images, conv_gammas, linear_gammas, attention=args.attention, **options)
            save_grid(search, plot, image=images[0])
            settings['best'] = {'conv_gamma': search.best[0], 'linear_gamma': search.best[1]}
            results = search.results
            note = f'best (largest mean ABPC): conv gamma {search.best[0]:g}, linear gamma {search.best[1]:g}'
        else:
            results, note = compare(model, images, methods, **options), None
            save_plot(results, plot, image=images[0],
                      title=f'{args.mode} by {args.unit} on {len(names)} image{"s" * (len(names) != 1)} '
                            f'({loaded.identity["model"]})')
    except ValueError as error:  # the comparison's checks of masks, target, patch size and relevance shapes
        return _error(str(error))

    table = evaluate_report.write(args.out, stem, results, settings, note)
    print(table)
    print(f'-> {os.path.join(args.out, stem)}.md, .json, .png')
    return 0


def _error(message):
    print(f'lxt-ext evaluate: error: {message}', file=sys.stderr)
    return 2


PROTOCOL_FLAGS = ('mode', 'fill', 'units_per_step', 'target')


def _resolve_protocol(args):
    """Fill the perturbation flags from ``--protocol`` (a flag given with another value is refused), or
    with their defaults (deletion, zeros, 1 unit per step, the predicted class)."""
    from ..evaluation.protocols import PROTOCOLS

    defaults = dict(mode='deletion', fill='zeros', units_per_step=1, target='predicted')
    if args.protocol:
        protocol = PROTOCOLS[args.protocol]._asdict()
        clashes = [f'--{k.replace("_", "-")} {getattr(args, k)}' for k in PROTOCOL_FLAGS
                   if getattr(args, k) is not None and str(getattr(args, k)) != str(protocol[k])]
        if clashes:
            raise ValueError(f'--protocol {args.protocol} sets ' + ', '.join(
                f'--{k.replace("_", "-")} {protocol[k]}' for k in PROTOCOL_FLAGS) +
                f'; drop {", ".join(clashes)} or the protocol')
        defaults.update({k: protocol[k] for k in PROTOCOL_FLAGS})
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def _run_generated(args):
    """``--generate N``: the methods on N generated shapes images, as an ``EvaluationJob`` (every torchrun
    process runs it; rank 0 writes the report)."""
    from ..job.evaluation import EvaluationJob, collect
    from ..job.outputs import SettingsMismatchError
    from .models import ModelError, fit_warnings, load_model

    if args.inputs or args.masks or args.limit:
        raise ValueError('--generate evaluates generated images: give no inputs, --masks or --limit')
    if args.model != 'embedded':
        raise ValueError('--generate draws the embedded model\'s shapes (five classes, 64 x 64): use --model embedded')
    if args.generate < 1:
        raise ValueError(f'--generate must be positive, got {args.generate}')
    if args.target not in ('label', 'predicted'):
        raise ValueError(f'--target with --generate is label or predicted, got {args.target!r}')
    if args.resamples < 1:
        raise ValueError(f'--resamples must be positive, got {args.resamples}')
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        raise ValueError(f'--device {args.device}, but torch sees no CUDA device')
    try:
        loaded = load_model(args.model, args.weights, args.seed)
    except ModelError as error:
        raise ValueError(str(error)) from None
    fit_warnings(loaded)
    if args.gamma_search:
        from ..evaluation.gamma_search import grid_methods
        conv_gammas, linear_gammas = _floats(args.conv_gammas), _floats(args.linear_gammas)
        methods = grid_methods(conv_gammas, linear_gammas, args.attention, loaded.forward)
    else:
        methods = parse(args.methods, loaded)
    model = loaded.model
    perturbation = dict(mode=args.mode, unit=args.unit, patch_size=_patch_size(args, model), fill=args.fill,
                        units_per_step=args.units_per_step, max_steps=args.max_steps)
    job = EvaluationJob(model, methods, args.out, args.generate, identity=loaded.identity, perturbation=perturbation,
                        seed=args.data_seed, target=args.target, preprocess=loaded.normalise, forward=loaded.forward,
                        batch_size=args.batch_size, device=args.device, resume=not args.no_resume,
                        progress=not args.quiet)
    try:
        summary = job.run()
    except SettingsMismatchError as error:
        return _error(str(error))
    if int(os.environ.get('RANK', '0')) != 0:
        return 0
    results, rows, recorded = collect(args.out)
    settings = {'command': evaluate_report.command_line(args), **recorded, 'protocol': args.protocol,
                'device': str(args.device), 'threads': torch.get_num_threads(), 'torch': torch.__version__,
                'world_size': int(os.environ.get('WORLD_SIZE', '1')), 'seconds': summary.seconds}
    stem = 'gamma_search' if args.gamma_search else 'evaluation'
    from ..job.evaluation import generated
    example = next(generated(args.data_seed, [[0]]))[0][0]  # image 0 of the set, whose heatmaps are drawn
    if args.gamma_search:
        from ..evaluation.gamma_search import GammaSearch, save_grid
        search = GammaSearch.of(conv_gammas, linear_gammas, args.attention, results)
        save_grid(search, os.path.join(args.out, f'{stem}.png'), image=example)
        settings['best'] = {'conv_gamma': search.best[0], 'linear_gamma': search.best[1]}
    else:
        from ..evaluation.compare import save_plot
        save_plot(results, os.path.join(args.out, f'{stem}.png'), image=example, band=0.95,
                  title=f'{args.mode} by {args.unit} on {args.generate} generated images '
                        f'({loaded.identity["model"]}), 95 % bootstrap bands')
    text = evaluate_report.write_statistics(args.out, stem, results, rows, settings, args.resamples)
    print(text)
    print(f'-> {os.path.join(args.out, stem)}.md, .json, .png')
    return 0


def _floats(text):
    try:
        return tuple(float(v) for v in text.split(',') if v.strip())
    except ValueError:
        raise ValueError(f'expected comma-separated numbers, got {text!r}') from None


def _target(text, labels):
    """``compare``'s target of ``--target``: None (each image's top class), the labels, or a class."""
    if text == 'predicted':
        return None
    if text == 'label':
        if labels is None:
            raise ValueError('--target label needs labelled data (the embedded samples)')
        return labels
    try:
        return int(text)
    except ValueError:
        raise ValueError(f'--target must be predicted, label or a class index, got {text!r}') from None


def _options(args, loaded, model, masks, target):
    """The keywords ``compare`` and ``gamma_search`` share: data, preprocessing and perturbation."""
    # the images stay in 0..1 (the plots show them); each batch is normalised for the model
    return dict(masks=masks, target=target, preprocess=loaded.normalise,
                batch_size=args.batch_size, forward=loaded.forward, progress=not args.quiet, mode=args.mode,
                unit=args.unit, patch_size=_patch_size(args, model), fill=args.fill,
                units_per_step=args.units_per_step, max_steps=args.max_steps)


def _patch_size(args, model):
    """``--patch-size``, else the model's own (torchvision, Hugging Face, timm), else 16."""
    if args.patch_size:
        return args.patch_size
    size = getattr(model, 'patch_size', None) or getattr(getattr(model, 'config', None), 'patch_size', None)
    patch_embed = getattr(model, 'patch_embed', None)
    size = size or (patch_embed.patch_size[0] if patch_embed is not None else None)
    return int(size if isinstance(size, int) else size[0]) if size else 16
