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
