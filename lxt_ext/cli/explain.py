"""``lxt-ext explain``: attribute image sets into heatmaps, relevance files and a JSONL index (resumable;
``torchrun`` runs it on several processes, GPUs or nodes). See ``lxt_ext.job`` for the job and the
output layout."""
import os
import sys

import torch

from .._docstrings import shared_parameters

HELP = 'attribute images (files, folders, globs, list files) and write heatmaps, relevance and an index'

EPILOG = '''output folder: run.json (settings), heatmaps/<path>.png, relevance/ (--relevance), parts/ (one
index part per batch), index.jsonl, failures.jsonl. Rerunning the same command resumes (finished batches
are skipped); other settings in the same folder are refused. Exit status (the same in every torchrun
process, decided after the index merge): 0 every readable image explained (unreadable ones are listed in
failures.jsonl and the summary), 1 with --strict when some images failed, 2 bad arguments or settings.
Several processes: torchrun --nproc_per_node=N -m lxt_ext explain ... (each process uses --threads CPU
threads; torchrun sets OMP_NUM_THREADS=1, so give --threads for the same threads as a 1-process run).'''


@shared_parameters('command_parser')
def add_arguments(parser):
    """Add the arguments of ``lxt-ext explain``."""
    from ..job.inputs import RESIZE_MODES
    from ..job.settings import DTYPES, RELEVANCE_FORMATS
    from .arguments import add_model_arguments
    from .models import COMPOSITES, FIRST_RULES

    parser.epilog = EPILOG
    parser.add_argument('inputs', nargs='*', help='image files, folders (recursive), globs, or .txt/.lst files '
                        'listing paths (default: the embedded model\'s sample images)')
    parser.add_argument('--out', default='explained', help='output folder (default: explained)')
    add_model_arguments(parser)
    parser.add_argument('--composite', choices=sorted(COMPOSITES),
                        help='default: vit_gamma for transformers, epsilon_gamma_box for CNNs')
    group = parser.add_argument_group('composite parameters (each composite takes some)')
    group.add_argument('--attention', choices=('attnlrp', 'cp'), help='AttnLRP or CP-LRP (vit_* composites)')
    group.add_argument('--epsilon', type=float)
    group.add_argument('--gamma', type=float, help='gamma of epsilon_gamma_box')
    group.add_argument('--conv-gamma', type=float, help='vit_gamma: gamma on convolutions (patch embedding)')
    group.add_argument('--linear-gamma', type=float, help='vit_gamma: gamma on Linear layers')
    group.add_argument('--stabilizer', type=float)
    group.add_argument('--first-rule', choices=FIRST_RULES, help='rule of the first layer (vit_* composites)')
    target = parser.add_mutually_exclusive_group()
    target.add_argument('--target', type=int, help='class to explain (default: each image\'s top class)')
    target.add_argument('--top-k', type=int, help='explain each image for its k top classes')
    parser.add_argument('--batch-size', type=int, default=16, help='images per batch (halved on out-of-memory)')
    parser.add_argument('--workers', type=int, default=2, help='DataLoader processes decoding images')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--dtype', choices=tuple(DTYPES), default='float32')
    parser.add_argument('--threads', type=int, help='torch CPU threads per process')
    parser.add_argument('--relevance', choices=[f for f in RELEVANCE_FORMATS if f],
                        help='also store the relevance: one .npy per image, or one safetensors shard per batch')
    parser.add_argument('--no-heatmaps', action='store_true', help='write no heatmap PNGs')
    parser.add_argument('--overlay', action='store_true', help='heatmaps drawn over the image')
    parser.add_argument('--cmap', default='coldnhot', help='a zennit colour map (zennit.image.CMAPS)')
    parser.add_argument('--resize', choices=RESIZE_MODES, default='stretch',
                        help='stretch: every image resized to the model\'s size; none: other sizes fail')
    parser.add_argument('--no-resume', action='store_true', help='refuse an output folder that holds a run')
    parser.add_argument('--strict', action='store_true', help='exit 1 (in every process) when some images failed; '
                        'by default they are reported and the run exits 0')
    parser.add_argument('--quiet', action='store_true', help='no progress bar')


def _error(message):
    print(f'lxt-ext explain: error: {message}', file=sys.stderr)
    return 2


@shared_parameters('command_args')
def run(args):
    """Run ``lxt-ext explain`` (in every process, under torchrun).

    Returns
    -------
    int
        The exit status: 0 every readable image explained, 1 with ``--strict`` when some images failed
        (decided after the index merge, the same in every process), 2 bad arguments, model files or
        settings.
    """
    from zennit.image import CMAPS

    from ..checks import NonFiniteError
    from ..job.outputs import SettingsMismatchError
    from ..job.runner import ExplainJob, summary_text
    from ..job.settings import JobSettings
    from ..errors import NotExplainableError
    from .models import PARAMETERS, ModelError, build_composite, default_composite, fit_warnings, load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cmap not in CMAPS:
        return _error(f'unknown colour map {args.cmap!r}; zennit has {", ".join(sorted(CMAPS))}')
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        return _error(f'--device {args.device}, but torch sees no CUDA device')
    inputs = args.inputs
    if not inputs:
        if args.model != 'embedded':
            return _error('give the images to explain (only the embedded model has default inputs)')
        from ..data import embedded
        inputs = [embedded.SAMPLES_DIR]
    try:
        loaded = load_model(args.model, args.weights, args.seed)
    except ModelError as error:
        return _error(str(error))
    fit_warnings(loaded)
    name = args.composite or default_composite(loaded)
    try:
        composite, description = build_composite(name, loaded, {k: getattr(args, k) for k in PARAMETERS})
    except ValueError as error:
        return _error(str(error))
    try:
        settings = JobSettings(
            inputs, args.out, size=loaded.size, mean=loaded.mean, std=loaded.std,
            identity={**loaded.identity, **description}, target=args.target, top_k=args.top_k,
            batch_size=args.batch_size, workers=args.workers, device=args.device, dtype=args.dtype,
            heatmaps=not args.no_heatmaps, overlay=args.overlay, relevance=args.relevance, cmap=args.cmap,
            resize=args.resize, resume=not args.no_resume, progress=not args.quiet)
    except ValueError as error:
        return _error(str(error))
    job = ExplainJob(loaded.model, composite, settings, forward=loaded.forward)
    try:
        summary = job.run()
    except (FileNotFoundError, ValueError, SettingsMismatchError, NonFiniteError) as error:
        return _error(str(error))
    except NotExplainableError as error:
        return _error(f'composite {name!r} does not fit {loaded.identity["model"]}: {error}')
    strict_failure = args.strict and summary.failures > 0
    if int(os.environ.get('RANK', '0')) == 0:
        print(summary_text(summary, int(os.environ.get('WORLD_SIZE', '1'))))
        if strict_failure:
            print('exit status 1: some images failed and --strict was given', file=sys.stderr)
    # Every rank has the merged failure count (ExplainJob.run), so all ranks exit alike: torchrun sees
    # a failed job only when --strict asks for one.
    return 1 if strict_failure else 0
