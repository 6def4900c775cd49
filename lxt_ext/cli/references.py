"""``lxt-ext references``: the reference samples of chosen units over a data set (the top images by relevance and by
activation of every unit), streamed on the job runner of ``lxt-ext explain`` (resumable, ``torchrun``), written as
image sheets and an HTML page per layer; with ``--text`` the top windows of a token corpus for a causal language
model, written as HTML pages of text spans. See :mod:`lxt_ext.job.references` for what is ranked and the output
folder.
"""
import os
import sys

import torch

from .._docstrings import shared_parameters

HELP = 'find each unit\'s top images by relevance and by activation over a data set; image sheets and HTML pages'

DEFAULT_GENERATED = 1000
DEFAULT_LAYER = 'neurons:3'
DEFAULT_WINDOW = 64
DEFAULT_TEXT_LAYER = 'neurons:-1'

EPILOG = f'''layers: neurons:<block> (MLP neurons), residual:<block> (a block's output), heads:<block> (attention
heads), or a name of lxt_ext.concepts.concept_layers; blocks count from 0, negative from the end (default
{DEFAULT_LAYER}).
Data: image files, folders, globs or list files, or --generate N shapes images of the embedded model (the default
without inputs: {DEFAULT_GENERATED:,}, seeds from --data-seed; the training seeds are refused).
Text: --text FILE... --model FOLDER searches the windows of a token corpus for a local Hugging Face causal language
model (each window explained for the sum over its positions of the logit of the next token, under
LanguageTransformer); the pages list each unit's top text spans, its top token highlighted, and its n-gram label.
Output folder: index.html (a link per layer), layers/<layer>/index.html (per unit its references with their
values), layers/<layer>/<mode>-<page>.png (the sheets, one row per unit), references.json (every reference),
index.jsonl (one row per image), topk/ and parts/ (one per batch). Rerunning the same command resumes (finished
batches are skipped); other settings in the same folder are refused. Several processes:
torchrun --nproc_per_node=N -m lxt_ext references ... (give --threads). Needs zennit-crp (pip install --no-deps
zennit-crp==0.6.0). Exit status: 0 done (unreadable images are listed in failures.jsonl), 1 with --strict when
some images failed, 2 bad arguments or settings.'''


@shared_parameters('command_parser')
def add_arguments(parser):
    """Add the arguments of ``lxt-ext references``."""
    from ..job.evaluation import DEFAULT_SEED
    from ..job.inputs import RESIZE_MODES
    from ..job.references import MAX_TARGETS
    from ..visualization.references import ROWS
    from .arguments import add_model_arguments
    from .models import FIRST_RULES, VIT_COMPOSITES

    parser.epilog = EPILOG
    parser.add_argument('inputs', nargs='*', help='image files, folders (recursive), globs, or .txt/.lst files '
                        f'listing paths (default: {DEFAULT_GENERATED:,} generated images for the embedded model)')
    parser.add_argument('--text', nargs='+', metavar='FILE', help='search a token corpus instead: UTF-8 text files, '
                        'tokenised with the --model folder\'s tokenizer (a causal language model, LLaMA family or '
                        'GPT-2), cut into windows of --window tokens')
    parser.add_argument('--window', type=int, help=f'with --text: tokens per window, stride the same, each file\'s last '
                        f'partial window dropped (default {DEFAULT_WINDOW})')
    parser.add_argument('--out', default='references', help='output folder (default: references)')
    add_model_arguments(parser)
    parser.add_argument('--layer', action='append', help=f'a concept layer (repeat for several; default '
                        f'{DEFAULT_LAYER}, with --text {DEFAULT_TEXT_LAYER})')
    parser.add_argument('--units', help='units of every layer: comma-separated indices and ranges, e.g. 0,3,8-15 '
                        '(default all)')
    parser.add_argument('--k', type=int, default=8, help='reference images per unit and mode (default 8)')
    parser.add_argument('--generate', type=int, metavar='N', help='search N generated shapes images (embedded model)')
    parser.add_argument('--data-seed', type=int, default=DEFAULT_SEED,
                        help=f'first seed of the generated images (default {DEFAULT_SEED})')
    parser.add_argument('--target', help='the class each image is explained for: label (generated images\' default), '
                        'predicted (the files\' default) or a class index')
    parser.add_argument('--max-target', choices=MAX_TARGETS, default='sum',
                        help='a unit\'s value in an image: summed over the tokens (default) or its largest token')
    parser.add_argument('--no-abs-norm', action='store_true',
                        help='do not divide the values by the image\'s summed |value| over the layer\'s units')
    parser.add_argument('--show', default='image,heatmap',
                        help=f'what each reference shows, comma-separated rows of {",".join(ROWS)} (default '
                        'image,heatmap; crop: the unit\'s patch with its neighbours, enlarged)')
    parser.add_argument('--composite', choices=sorted(VIT_COMPOSITES),
                        help='default: vit_gamma (images; text is explained under LanguageTransformer)')
    group = parser.add_argument_group('composite parameters')
    group.add_argument('--attention', choices=('attnlrp', 'cp'), help='AttnLRP or CP-LRP (text: default attnlrp)')
    group.add_argument('--epsilon', type=float)
    group.add_argument('--conv-gamma', type=float, help='vit_gamma: gamma on convolutions (patch embedding)')
    group.add_argument('--linear-gamma', type=float, help='vit_gamma: gamma on Linear layers')
    group.add_argument('--stabilizer', type=float)
    group.add_argument('--first-rule', choices=FIRST_RULES, help='rule of the first layer')
    parser.add_argument('--batch-size', type=int, help='images (windows) per batch (default 32; text 16)')
    parser.add_argument('--workers', type=int, default=2, help='DataLoader processes decoding image files')
    parser.add_argument('--resize', choices=RESIZE_MODES, default='stretch',
                        help='stretch: every image resized to the model\'s size; none: other sizes fail')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--threads', type=int, help='torch CPU threads per process')
    parser.add_argument('--no-resume', action='store_true', help='refuse an output folder that holds a run')
    parser.add_argument('--strict', action='store_true', help='exit 1 when some images failed')
    parser.add_argument('--quiet', action='store_true', help='no progress bars')


def _error(message):
    print(f'lxt-ext references: error: {message}', file=sys.stderr)
    return 2


def parse_units(text):
    """The units of ``--units``: comma-separated indices and ranges ``a-b`` (both ends included).

    Parameters
    ----------
    text : str or None
        The flag's value.

    Returns
    -------
    list of int or None
        None for all units.

    Raises
    ------
    ValueError
        Anything else than indices and ranges.
    """
    if text is None:
        return None
    units = []
    for part in text.split(','):
        part = part.strip()
        low, dash, high = part.partition('-')
        try:
            if dash:
                first, last = int(low), int(high)
                if last < first:
                    raise ValueError
                units += range(first, last + 1)
            else:
                units.append(int(part))
        except ValueError:
            raise ValueError(f'--units takes comma-separated unit indices and ranges like 0,3,8-15; got {text!r}') \
                from None
    return units


def _target(text):
    if text is None or text in ('label', 'predicted'):
        return text
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f'--target must be label, predicted or a class index, got {text!r}')
    return value


@shared_parameters('command_args')
def run(args):
    """Run ``lxt-ext references`` (in every process, under torchrun).

    Returns
    -------
    int
        The exit status: 0 done, 1 with ``--strict`` when some images failed, 2 bad arguments or settings.
    """
    from ..job.outputs import SettingsMismatchError

    if args.threads is not None:
        if args.threads < 1:
            return _error(f'--threads must be at least 1, got {args.threads}')
        torch.set_num_threads(args.threads)
    try:
        import lxt_ext.concepts  # noqa: F401  (zennit-crp installed?)
    except ImportError as error:
        return _error(str(error))
    try:
        job = _job(args)
    except ValueError as error:
        return _error(str(error))
    try:
        summary = job.run()
    except (FileNotFoundError, ValueError, SettingsMismatchError) as error:
        return _error(str(error))
    strict_failure = args.strict and summary.failures > 0
    if int(os.environ.get('RANK', '0')) == 0:
        world = int(os.environ.get('WORLD_SIZE', '1'))
        what = 'windows' if args.text else 'images'
        lines = [f'searched {summary.images} {what} in {summary.seconds:.1f} s ({summary.images_per_second:.2f} '
                 f'{what}/s{" on this rank" if world > 1 else ""})'
                 + (f'; {summary.skipped} skipped, finished by an earlier run' if summary.skipped else '')]
        if summary.failures:
            lines.append(f'{summary.failures} images failed (listed in {os.path.join(args.out, "failures.jsonl")})')
            lines += [f'  {path}: {error}' for path, error in summary.failed]
        lines.append(f'outputs: {os.path.join(args.out, "index.html")} (references: '
                     f'{os.path.join(args.out, "references.json")})')
        print('\n'.join(lines))
        if strict_failure:
            print('exit status 1: some images failed and --strict was given', file=sys.stderr)
    return 1 if strict_failure else 0


def _job(args):
    """The :class:`~lxt_ext.job.references.ReferenceJob` of the arguments; ValueError naming a bad one."""
    from ..concepts import concept_layers
    from ..job.references import ReferenceJob
    from ..concepts import resolve_layer
    from .models import PARAMETERS, ModelError, build_composite, fit_warnings, load_model

    if args.k < 1:
        raise ValueError(f'--k must be at least 1, got {args.k}')
    if args.text:
        return _text_job(args)
    if args.window is not None:
        raise ValueError('--window is for --text (token windows of a corpus)')
    args.batch_size = 32 if args.batch_size is None else args.batch_size
    args.composite = args.composite or 'vit_gamma'
    if args.batch_size < 1:
        raise ValueError(f'--batch-size must be at least 1, got {args.batch_size}')
    if args.workers < 0:
        raise ValueError(f'--workers must be 0 or more, got {args.workers}')
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        raise ValueError(f'--device {args.device}, but torch sees no CUDA device')
    rows = tuple(r.strip() for r in args.show.split(',') if r.strip())
    from ..visualization.references import ROWS
    if not rows or any(r not in ROWS for r in rows):
        raise ValueError(f'--show takes comma-separated rows of {", ".join(ROWS)}; got {args.show!r}')
    units = parse_units(args.units)
    target = _target(args.target)
    generate = args.generate
    if args.inputs and generate is not None:
        raise ValueError('give either inputs or --generate N, not both')
    if not args.inputs:
        if args.model != 'embedded':
            raise ValueError('give the images to search (generated images are the embedded model\'s shapes: '
                             'only --model embedded has them)')
        generate = DEFAULT_GENERATED if generate is None else generate
    if generate is not None and args.model != 'embedded':
        raise ValueError('--generate draws the embedded model\'s shapes (five classes, 64 x 64): use --model embedded')
    if generate is not None and generate < 1:
        raise ValueError(f'--generate must be positive, got {generate}')
    try:
        loaded = load_model(args.model, args.weights, args.seed)
    except ModelError as error:
        raise ValueError(str(error)) from None
    fit_warnings(loaded)
    if not loaded.transformer:
        raise ValueError(f'{loaded.identity["model"]} is no transformer: reference samples here need a transformer '
                         f'composite (vit_gamma, vit_epsilon)')
    composite, description = build_composite(args.composite, loaded, {k: getattr(args, k, None) for k in PARAMETERS})
    try:
        layers = concept_layers(loaded.model)
    except TypeError as error:
        raise ValueError(str(error)) from None
    names = [resolve_layer(spec, layers) for spec in (args.layer or [DEFAULT_LAYER])]
    classes = None
    if args.model == 'embedded':
        from ..data import embedded
        classes = embedded.CLASSES
    return ReferenceJob(loaded.model, composite, names, args.out, k=args.k, units=units,
                        inputs=list(args.inputs) if args.inputs else None, generate=generate,
                        data_seed=args.data_seed, size=loaded.size, mean=loaded.mean, std=loaded.std,
                        resize=args.resize, target=target, max_target=args.max_target, abs_norm=not args.no_abs_norm,
                        identity={**loaded.identity, **description}, forward=loaded.forward, classes=classes, rows=rows,
                        batch_size=args.batch_size, workers=args.workers, device=args.device,
                        resume=not args.no_resume, progress=not args.quiet)


def _text_job(args):
    """The :class:`~lxt_ext.job.references.TextReferenceJob` of ``--text``; ValueError naming a bad argument."""
    from ..composites import LanguageTransformer
    from ..concepts import concept_layers
    from ..job.references import TextReferenceJob
    from ..concepts import resolve_layer
    from .explain_text import load_language_model

    if args.inputs or args.generate is not None:
        raise ValueError('give either --text FILE... (a token corpus) or images (inputs, --generate), not both')
    for flag, value in (('--composite', args.composite), ('--conv-gamma', args.conv_gamma),
                        ('--linear-gamma', args.linear_gamma), ('--first-rule', args.first_rule),
                        ('--target', args.target), ('--weights', getattr(args, 'weights', None))):
        if value is not None:
            raise ValueError(f'{flag} is for images; text windows are explained under LanguageTransformer '
                             f'(--attention, --epsilon) for the logits of their next tokens')
    if args.show != 'image,heatmap':
        raise ValueError('--show is for image sheets; text references are HTML pages')
    window = DEFAULT_WINDOW if args.window is None else args.window
    if window < 2:
        raise ValueError(f'--window must be at least 2 tokens, got {window}')
    batch_size = 16 if args.batch_size is None else args.batch_size
    if batch_size < 1:
        raise ValueError(f'--batch-size must be at least 1, got {batch_size}')
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        raise ValueError(f'--device {args.device}, but torch sees no CUDA device')
    missing = [path for path in args.text if not os.path.isfile(path)]
    if missing:
        raise ValueError(f'no such text file{"s" * (len(missing) > 1)}: {", ".join(missing)}')
    if args.model == 'embedded' or not os.path.isdir(args.model):
        raise ValueError(f'--text needs --model FOLDER, a local Hugging Face causal language model with its '
                         f'tokenizer (got {args.model!r})')
    units = parse_units(args.units)
    model, tokenizer = load_language_model(args.model)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    try:
        layers = concept_layers(model)
    except TypeError as error:
        raise ValueError(str(error)) from None
    names = [resolve_layer(spec, layers) for spec in (args.layer or [DEFAULT_TEXT_LAYER])]
    attention = args.attention or 'attnlrp'
    parameters = {key: getattr(args, key) for key in ('epsilon', 'stabilizer') if getattr(args, key) is not None}
    composite = LanguageTransformer(attention=attention, **parameters)
    identity = {'model': os.path.abspath(args.model), 'composite': 'LanguageTransformer',
                'attention': attention, **parameters}
    return TextReferenceJob(model, tokenizer, composite, names, args.out, list(args.text), window=window, k=args.k,
                            units=units, max_target=args.max_target, abs_norm=not args.no_abs_norm, identity=identity,
                            batch_size=batch_size, device=args.device, resume=not args.no_resume,
                            progress=not args.quiet)
