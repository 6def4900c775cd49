"""What ``lxt-ext evaluate`` records and writes: the run's settings (with the command line that reproduces
it), and ``<stem>.md`` (that command line above the results table) and ``<stem>.json`` (the settings and
every method's numbers) in the output folder. The plots are drawn by ``lxt_ext.evaluation``."""
import json
import os

import torch

# the comparison's options that identify a run (the others are data, callables or a progress bar)
RECORDED_OPTIONS = ('mode', 'unit', 'patch_size', 'fill', 'units_per_step', 'max_steps', 'batch_size')
# the gamma search's flags, left out of the command line of a run without a search
SEARCH_FLAGS = ('conv_gammas', 'linear_gammas', 'attention')


def command_line(args):
    """The command that reproduces a run, every option spelled out.

    Parameters
    ----------
    args : argparse.Namespace
        The parsed arguments of ``lxt-ext evaluate``.

    Returns
    -------
    str
        E.g. ``'lxt-ext evaluate images --model vit_b_16 --seed 0 ...'``.
    """
    words = ['lxt-ext', 'evaluate', *args.inputs]
    for key, value in vars(args).items():
        # store_true flags that are off and options left unset have no spelling
        if key in ('inputs', 'run', 'command') or value is None or value is False:
            continue
        if key in SEARCH_FLAGS and not args.gamma_search:
            continue
        words.append('--' + key.replace('_', '-'))
        if value is not True:
            words.append(str(value))
    return ' '.join(words)


def settings(args, loaded, options, images):
    """The settings record of a run, as ``<stem>.json`` holds it.

    Parameters
    ----------
    args : argparse.Namespace
        The parsed arguments of ``lxt-ext evaluate``.
    loaded : lxt_ext.cli.models.LoadedModel
        The model (its identity: spec, weights' checksum, seed).
    options : dict
        The keywords given to ``compare`` or ``gamma_search``; those of :data:`RECORDED_OPTIONS` are
        recorded.
    images : int
        How many images are evaluated.

    Returns
    -------
    dict
        The command line, the model's identity, the number of images, the target, the recorded options,
        the device, torch's CPU threads and torch's version.
    """
    return {'command': command_line(args), **loaded.identity, 'images': images, 'target': args.target,
            **{key: value for key, value in options.items() if key in RECORDED_OPTIONS},
            'device': str(args.device), 'threads': torch.get_num_threads(), 'torch': torch.__version__}


def write(folder, stem, results, settings, note=None):
    """Write ``<stem>.md`` and ``<stem>.json`` to ``folder``.

    Parameters
    ----------
    folder : str
        The output folder (it exists).
    stem : str
        ``'evaluation'`` or ``'gamma_search'``.
    results : list of lxt_ext.evaluation.compare.MethodResult
        One per method (or per gamma pair).
    settings : dict
        The run's :func:`settings`.
    note : str, optional
        A line written (and returned) below the table, e.g. the gamma search's best pair.

    Returns
    -------
    str
        The markdown table (with ``note``), as the command prints it.
    """
    from ..evaluation.compare import markdown_table, results_json

    table = markdown_table(results)
    if note:
        table += f'\n\n{note}'
    with open(os.path.join(folder, f'{stem}.md'), 'w') as file:
        file.write(f"{settings['command']}\n\n{table}\n")
    with open(os.path.join(folder, f'{stem}.json'), 'w') as file:
        json.dump(results_json(results, settings), file, indent=1)
    return table


def write_statistics(folder, stem, results, rows, settings, resamples):
    """Write ``<stem>.md`` and ``<stem>.json`` of an evaluation at scale: the statistics fixed before the run
    stated first, the model's accuracy on the images, the results with 95 % bootstrap intervals, then the
    methods ranked by ABPC (the primary metric) and by relevance mass with their paired, Holm-corrected
    differences.

    Parameters
    ----------
    folder : str
        The output folder (it exists).
    stem : str
        ``'evaluation'`` or ``'gamma_search'``.
    results : list of lxt_ext.evaluation.compare.MethodResult
        One per method, over all images (``lxt_ext.job.evaluation.collect``).
    rows : list of dict
        The index rows (``label``, ``predicted``).
    settings : dict
        The run's settings (recorded ones, protocol, command, device).
    resamples : int
        Bootstrap resamples.

    Returns
    -------
    str
        The markdown as written (without the command line).
    """
    from ..evaluation.compare import results_json
    from ..evaluation.protocols import PROTOCOLS
    from ..evaluation.statistics import bootstrap_interval, paired_comparisons, statistics_markdown

    n = len(rows)
    correct = sum(row['label'] == row['predicted'] for row in rows)
    protocol = settings.get('protocol')
    described = PROTOCOLS[protocol].description if protocol else 'custom settings'
    blocks = -(-n // 256)
    pairs = len(results) * (len(results) - 1) // 2
    lines = [
        f'Settings fixed before the run. Primary metric: ABPC, the area between the LeRF and MoRF '
        f'{settings["mode"]} curves ({described}; unit {settings["unit"]} {settings["patch_size"]} px, '
        f'{settings["units_per_step"]} per step, fill {settings["fill"]}, the {settings["target"]} class\'s logit). '
        f'{n} images generated with the seeds {settings["data_seed"]}..{settings["data_seed"] + blocks - 1} '
        f'(256 per seed), '
        f'which training never drew from. Statistics: each method\'s mean with a 95 % percentile-bootstrap '
        f'interval over the images ({resamples} resamples, seed 0); every two methods compared by the paired '
        f'bootstrap of their mean difference (the same resamples), two-sided p-values Holm-corrected across the '
        f'{pairs} pairs, significant at 0.05. Relevance mass is a second family, tested the same way on the '
        f'images where every method puts some positive relevance.',
        '',
        f'Model accuracy on these images: {correct / n:.4f} ({n - correct} of {n} misclassified); each image is '
        f'explained for its {settings["target"]} class.',
        '', '| method | ABPC [95 % interval] | MoRF area | LeRF area | relevance mass [95 % interval] | '
        'pointing game | s / image |', '|---|---|---:|---:|---|---:|---:|']
    record = results_json(results, settings)
    record['accuracy'] = correct / n
    record['statistics'] = {}
    fmt = lambda v: format(v, '.4g')  # noqa: E731
    abpc_intervals = {}
    for r in results:
        abpc = bootstrap_interval(r.abpc, resamples=resamples)
        mass = r.relevance_mass[~torch.isnan(r.relevance_mass)]
        mass = bootstrap_interval(mass, resamples=resamples) if mass.numel() else None
        s = r.summary()
        lines.append(f'| {r.name} | {fmt(abpc.mean)} [{fmt(abpc.low)}, {fmt(abpc.high)}] | {fmt(s["morf_area"])} | '
                     f'{fmt(s["lerf_area"])} | ' + (f'{mass.mean:.3f} [{mass.low:.3f}, {mass.high:.3f}]' if mass
                                                    else 'n/a') +
                     f' | {s["pointing_game"]:.3f} | {s["seconds_per_image"]:.3g} |')
        record['methods'][r.name]['intervals'] = {'abpc': abpc._asdict(), 'relevance_mass': mass and mass._asdict()}
        abpc_intervals[r.name] = abpc
    sections = []
    for metric, column in (('ABPC', 'abpc'), ('relevance mass', 'relevance_mass')):
        scores = {r.name: getattr(r, column) for r in results}
        finite = torch.stack([torch.isfinite(v) for v in scores.values()]).all(0)
        scores = {name: v[finite] for name, v in scores.items()}
        if len(scores) < 2 or not finite.any():
            continue
        comparisons = paired_comparisons(scores, resamples=resamples)
        sections += ['', f'### {metric}: ranking and paired differences ({int(finite.sum())} images)', '',
                     statistics_markdown(scores, comparisons, metric=metric, resamples=resamples,
                                         # the table's ABPC intervals are over the same (all) images
                                         intervals=abpc_intervals if column == 'abpc' and finite.all() else None)]
        record['statistics'][column] = {'images': int(finite.sum()),
                                        'comparisons': [c._asdict() for c in comparisons]}
    text = '\n'.join(lines + sections)
    with open(os.path.join(folder, f'{stem}.md'), 'w') as file:
        file.write(f"{settings['command']}\n\n{text}\n")
    with open(os.path.join(folder, f'{stem}.json'), 'w') as file:
        json.dump(record, file, indent=1)
    return text
