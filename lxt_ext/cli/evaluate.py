"""``lxt-ext evaluate``: compare attribution methods (LRP composites and baselines) on a data set by
perturbation faithfulness and localisation; print a table, write it as markdown and JSON, and a PNG of
the curves and heatmaps. ``--gamma-search`` evaluates a grid of ViTGamma gammas instead."""
import json
import os
import sys

import torch

HELP = 'compare attribution methods (LRP composites, baselines) by perturbation faithfulness and localisation'

BASELINES = ('gradient', 'gradient_x_input', 'integrated_gradients', 'smoothgrad', 'attention_rollout')
DEFAULT_VIT_METHODS = ('vit_epsilon:attnlrp', 'vit_epsilon:cp', 'vit_gamma:attnlrp', 'vit_gamma:cp') + BASELINES
DEFAULT_CNN_METHODS = ('epsilon_gamma_box', 'epsilon_plus', 'gradient', 'gradient_x_input', 'integrated_gradients',
                       'smoothgrad')

EPILOG = f'''methods (comma-separated): LRP composites by the names of lxt-ext explain, with :attnlrp or :cp for the
vit_* composites (vit_gamma:cp), and the baselines {", ".join(BASELINES)}.
Default: {",".join(DEFAULT_VIT_METHODS)} for transformers.
Without inputs the embedded model's shipped samples are used with their object masks (relevance mass,
pointing game); other inputs need --masks for those columns. Output folder: evaluation.md, evaluation.json,
evaluation.png (with --gamma-search: gamma_search.md, gamma_search.json, gamma_search.png).
Exit status: 0 done, 2 bad arguments.'''


def _floats(text):
    try:
        return tuple(float(v) for v in text.split(',') if v.strip())
    except ValueError:
        raise ValueError(f'expected comma-separated numbers, got {text!r}') from None


def add_arguments(parser):
    from ..evaluation.gamma_search import CONV_GAMMAS, LINEAR_GAMMAS
    from ..evaluation.perturbation import FILLS, MODES, UNITS

    parser.epilog = EPILOG
    parser.add_argument('inputs', nargs='*', help='image files, folders, globs or list files (default: the embedded '
                        'samples, with masks)')
    parser.add_argument('--masks', help='folder of object masks (white = object), one PNG per image with the '
                        'image\'s file name stem')
    parser.add_argument('--model', default='embedded', help='as in lxt-ext explain (default: embedded)')
    parser.add_argument('--weights', help='local weights file (torchvision, timm models)')
    parser.add_argument('--seed', type=int, default=0, help='seed of random weights when --weights is not given')
    parser.add_argument('--methods', help='comma-separated methods (see below; default by model kind)')
    parser.add_argument('--target', default='predicted',
                        help='predicted (each image\'s top class, default), label (the embedded samples\' labels) '
                        'or a class index')
    group = parser.add_argument_group('perturbation')
    group.add_argument('--mode', choices=MODES, default='deletion')
    group.add_argument('--unit', choices=[u for u in UNITS if u != 'token'], default='patch')
    group.add_argument('--patch-size', type=int, help='default: the model\'s patch size, else 16')
    group.add_argument('--fill', choices=FILLS, default='zeros',
                       help='on the normalised input (zeros: the mean colour)')
    group.add_argument('--units-per-step', type=int, default=1)
    group.add_argument('--max-steps', type=int, help='stop after this many steps')
    group = parser.add_argument_group('gamma search')
    group.add_argument('--gamma-search', action='store_true', help='evaluate ViTGamma over a gamma grid instead')
    group.add_argument('--conv-gammas', default=','.join(f'{g:g}' for g in CONV_GAMMAS))
    group.add_argument('--linear-gammas', default=','.join(f'{g:g}' for g in LINEAR_GAMMAS))
    group.add_argument('--attention', choices=('attnlrp', 'cp'), default='cp', help='attention rule of the search')
    parser.add_argument('--limit', type=int, help='use only the first N images')
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--threads', type=int, help='torch CPU threads')
    parser.add_argument('--out', default='evaluation', help='output folder (default: evaluation)')
    parser.add_argument('--quiet', action='store_true', help='no progress bar')


def _error(message):
    print(f'lxt-ext evaluate: error: {message}', file=sys.stderr)
    return 2


def _data(args, loaded):
    """``(images, masks or None, labels or None, names)``."""
    from ..job.inputs import collect, decode

    if not args.inputs:
        if args.model != 'embedded':
            raise ValueError('the shipped samples belong to the embedded model; give inputs for --model '
                             f'{args.model}')
        from ..data import embedded
        images, masks, labels, names = embedded.load_samples()
    else:
        root, paths = collect(args.inputs)
        images = torch.stack([decode(os.path.join(root, p), loaded.size) for p in paths])
        names, labels, masks = paths, None, None
        if args.masks:
            from PIL import Image
            import numpy as np
            found = []
            for p in paths:
                mask_path = os.path.join(args.masks, os.path.splitext(os.path.basename(p))[0] + '.png')
                if not os.path.isfile(mask_path):
                    raise ValueError(f'no mask {mask_path} for the image {p}')
                with Image.open(mask_path) as mask:
                    mask = mask.convert('L').resize((loaded.size, loaded.size), Image.NEAREST)
                found.append(torch.from_numpy(np.array(mask) > 127))
            masks = torch.stack(found)
    if args.masks and not args.inputs:
        raise ValueError('--masks goes with inputs; the embedded samples have their own')
    if args.limit:
        images, names = images[:args.limit], names[:args.limit]
        masks = None if masks is None else masks[:args.limit]
        labels = None if labels is None else labels[:args.limit]
    return images, masks, labels, names


def _methods(args, loaded):
    from .. import baselines
    from ..evaluation.compare import lrp_method
    from .models import COMPOSITES, build_composite

    names = args.methods.split(',') if args.methods else (
        DEFAULT_VIT_METHODS if loaded.transformer else DEFAULT_CNN_METHODS)
    methods = {}
    for name in (n.strip() for n in names if n.strip()):
        if name in BASELINES:
            method = getattr(baselines, name)
            methods[name] = (lambda method: lambda model, x, t: method(model, x, t, forward=loaded.forward))(method)
            continue
        composite, _, attention = name.partition(':')
        if composite not in COMPOSITES:
            raise ValueError(f'unknown method {name!r}: give composites {sorted(COMPOSITES)} (vit_*:attnlrp|cp) or '
                             f'baselines {list(BASELINES)}')
        parameters = {'attention': attention} if attention else {}
        build_composite(composite, loaded, parameters)  # refuses a misfit now, with its message
        methods[name] = lrp_method(lambda c=composite, p=parameters: build_composite(c, loaded, p)[0],
                                   forward=loaded.forward)
    return methods


def _patch_size(args, model):
    if args.patch_size:
        return args.patch_size
    size = getattr(model, 'patch_size', None) or getattr(getattr(model, 'config', None), 'patch_size', None)
    patch_embed = getattr(model, 'patch_embed', None)
    size = size or (patch_embed.patch_size[0] if patch_embed is not None else None)
    return int(size if isinstance(size, int) else size[0]) if size else 16


def _command_line(args):
    """The command that reproduces this run, every option spelled out."""
    words = ['lxt-ext', 'evaluate', *args.inputs]
    for key, value in vars(args).items():
        if key in ('inputs', 'run', 'command') or value is None or value is False:
            continue
        if key in ('conv_gammas', 'linear_gammas', 'attention') and not args.gamma_search:
            continue  # the search's settings, unused without it
        words.append('--' + key.replace('_', '-'))
        if value is not True:
            words.append(str(value))
    return ' '.join(words)


def run(args):
    from ..evaluation.compare import compare, markdown_table, results_json, save_plot
    from ..evaluation.gamma_search import gamma_search, save_grid
    from .models import ModelError, load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        loaded = load_model(args.model, args.weights, args.seed)
        images, masks, labels, names = _data(args, loaded)
        methods = None if args.gamma_search else _methods(args, loaded)
        conv_gammas, linear_gammas = _floats(args.conv_gammas), _floats(args.linear_gammas)
    except (ModelError, ValueError, FileNotFoundError) as error:
        return _error(str(error))
    if args.target == 'predicted':
        target = None
    elif args.target == 'label':
        if labels is None:
            return _error('--target label needs labelled data (the embedded samples)')
        target = labels
    else:
        try:
            target = int(args.target)
        except ValueError:
            return _error(f'--target must be predicted, label or a class index, got {args.target!r}')
    if args.gamma_search and not loaded.transformer:
        return _error('--gamma-search tunes ViTGamma, which needs a transformer model')
    model = loaded.model.to(args.device)
    mean = torch.as_tensor(loaded.mean, dtype=torch.float32).view(1, -1, 1, 1).to(args.device)
    std = torch.as_tensor(loaded.std, dtype=torch.float32).view(1, -1, 1, 1).to(args.device)
    options = dict(masks=masks, target=target, preprocess=lambda im: (im - mean) / std, batch_size=args.batch_size,
                   forward=loaded.forward, progress=not args.quiet, mode=args.mode, unit=args.unit,
                   patch_size=_patch_size(args, model), fill=args.fill, units_per_step=args.units_per_step,
                   max_steps=args.max_steps)
    settings = {'command': _command_line(args), **loaded.identity, 'images': len(names), 'target': args.target,
                **{k: v for k, v in options.items() if k in ('mode', 'unit', 'patch_size', 'fill', 'units_per_step',
                                                              'max_steps', 'batch_size')},
                'device': str(args.device), 'threads': torch.get_num_threads(), 'torch': torch.__version__}
    os.makedirs(args.out, exist_ok=True)
    stem = 'gamma_search' if args.gamma_search else 'evaluation'
    try:
        if args.gamma_search:
            search = gamma_search(model, images, conv_gammas, linear_gammas, attention=args.attention, **options)
            results = search.results
            save_grid(search, os.path.join(args.out, f'{stem}.png'), image=images[0])
            settings['best'] = {'conv_gamma': search.best[0], 'linear_gamma': search.best[1]}
        else:
            results = compare(model, images, methods, **options)
            save_plot(results, os.path.join(args.out, f'{stem}.png'), image=images[0],
                      title=f'{args.mode} by {args.unit} on {len(names)} image{"s" * (len(names) != 1)} '
                            f'({loaded.identity["model"]})')
    except ValueError as error:
        return _error(str(error))
    table = markdown_table(results)
    if args.gamma_search:
        table += f'\n\nbest (largest mean ABPC): conv gamma {search.best[0]:g}, linear gamma {search.best[1]:g}'
    with open(os.path.join(args.out, f'{stem}.md'), 'w') as file:
        file.write(f"{settings['command']}\n\n{table}\n")
    with open(os.path.join(args.out, f'{stem}.json'), 'w') as file:
        json.dump(results_json(results, settings), file, indent=1)
    print(table)
    print(f'-> {os.path.join(args.out, stem)}.md, .json, .png')
    return 0
