"""``EvaluationJob`` (``lxt-ext evaluate --generate N``): attribution methods compared on freshly generated
held-out images of the embedded model's shapes, with their masks, on the job runner of ``lxt-ext explain``
(:class:`~lxt_ext.job.runner.BatchJob`): streamed in batches, resumable, sharded over ``torchrun`` processes.

The images: image ``i`` is image ``i mod 256`` of ``lxt_ext.data.shapes.generate(256, seed + i // 256)``,
so the set depends on ``seed`` and the count alone (not on the batch size or the number of processes),
and seeds that the embedded model's training drew from (:data:`TRAINING_SEEDS`) are refused. Each image
is explained for its true class (or its predicted one); per image and method the job records the
MoRF/LeRF areas and ABPC (:func:`lxt_ext.evaluation.faithfulness`), relevance mass accuracy and the
pointing game against the object mask, the attribution time, and the image's label, predicted class and
explained logit.

Output folder (beside ``lxt_ext.job.outputs``' ``run.json``, ``parts/`` and ``index.jsonl``, one row per
image with ``scores[method]``): ``curves/batch-<b>.pt``, the batch's curves per method ((n, 2, S + 1):
MoRF, LeRF) and the relevance of its first image summed over channels, written before the batch's part.
:func:`collect` reads a finished folder back as :class:`~lxt_ext.evaluation.MethodResult` per method.
"""
import json
import os
import time

import torch

from ..attribution import logits_of
from ..evaluation.compare import MethodResult
from ..evaluation.localization import pointing_game, relevance_mass_accuracy
from ..evaluation.perturbation import Faithfulness, faithfulness
from .outputs import INDEX_FILE, atomic_write
from .runner import BatchJob

__all__ = ['EvaluationJob', 'collect', 'BLOCK', 'TRAINING_SEEDS', 'DEFAULT_SEED', 'check_generated', 'generated']

BLOCK = 256  # images drawn per seed
# python/training/train_default_model.py draws its training set from --seed (0), its augmentation from
# seed + 1 and its held-out set from seed + 2
TRAINING_SEEDS = (0, 1, 2)
DEFAULT_SEED = 1_000_000
ROOT = 'generated'


def _block_seeds(seed, count):
    return range(seed, seed + -(-count // BLOCK))


def check_generated(seed, count):
    """Refuse a set of generated images that would draw from the embedded model's training seeds.

    Parameters
    ----------
    seed : int
        The first seed of the images' blocks.
    count : int
        How many images.

    Raises
    ------
    ValueError
        Naming the seed range and the training seeds in it.
    """
    used = sorted(set(_block_seeds(seed, count)) & set(TRAINING_SEEDS))
    if used:
        seeds = _block_seeds(seed, count)
        raise ValueError(f'seed {seed} draws {count} images from the seeds {seeds.start}..{seeds.stop - 1}, '
                         f'which include {used}, the embedded model\'s training seeds: choose a seed above '
                         f'{max(TRAINING_SEEDS)}')


def generated(seed, spans):
    """The generated images of each span, in order (module doc: image ``i`` is image ``i mod BLOCK`` of the
    block of seed ``seed + i // BLOCK``); one block is kept at a time, so spans in increasing order generate
    each block once.

    Parameters
    ----------
    seed : int
        The first seed of the blocks.
    spans : iterable of list of int
        Image indices, one list per batch.

    Yields
    ------
    tuple of torch.Tensor
        ``(images, masks, labels)`` of a span: ``(n, 3, 64, 64)`` in 0..1, ``(n, 64, 64)`` bool, ``(n,)``.
    """
    from ..data import shapes

    cached = {}
    for span in spans:
        parts = []
        for i in span:
            block = seed + i // BLOCK
            if block not in cached:
                cached.clear()  # batches run in order: one block at a time stays in memory
                cached[block] = shapes.generate(BLOCK, seed=block)
            images, masks, labels = cached[block]
            parts.append((images[i % BLOCK], masks[i % BLOCK], labels[i % BLOCK]))
        yield tuple(torch.stack(column) for column in zip(*parts))


class EvaluationJob(BatchJob):
    """Evaluate attribution methods on ``count`` generated shapes images into ``out``.

    Parameters
    ----------
    model : torch.nn.Module
        The embedded model (any classifier of 64 x 64 images of the five shape classes), in eval mode.
    methods : dict
        Name -> ``method(model, x, target) -> relevance`` shaped like ``x`` (``lxt_ext.cli.methods``).
    out : str
        The output folder.
    count : int
        How many images.
    identity : dict
        What identifies the model and the methods (recorded; a resume with other values is refused).
    perturbation : dict
        The keywords of :func:`lxt_ext.evaluation.faithfulness` (``mode``, ``unit``, ``patch_size``,
        ``fill``, ``units_per_step``, ``max_steps``), recorded.
    seed : int, optional
        The first seed of the images' blocks (default :data:`DEFAULT_SEED`).
    target : {'label', 'predicted'}, optional
        Explain each image's true class (default) or its predicted one.
    preprocess : callable, optional
        Applied to each batch of images in 0..1 before the model (normalisation); perturbation acts after it.
    forward : callable, optional
        ``forward(model, x) -> logits`` (default ``model(x)``).
    batch_size : int, optional
        Images per batch (recorded: it fixes the batches a resume skips).
    device : str, optional
        The torch device.
    resume, progress, writers
        As in :class:`~lxt_ext.job.runner.BatchJob`.

    Raises
    ------
    ValueError
        For a count below 1, an unknown target, or seeds the model was trained on.
    """

    verb, unit = 'evaluating', 'img'

    def __init__(self, model, methods, out, count, identity, perturbation, seed=DEFAULT_SEED, target='label',
                 preprocess=None, forward=None, batch_size=16, device='cpu', resume=True, progress=True, writers=1):
        if count < 1:
            raise ValueError(f'the number of generated images must be positive, got {count}')
        if batch_size < 1:
            raise ValueError(f'batch_size must be positive, got {batch_size}')
        if target not in ('label', 'predicted'):
            raise ValueError(f"target must be 'label' or 'predicted', got {target!r}")
        if not methods:
            raise ValueError('no methods to evaluate')
        check_generated(seed, count)
        super().__init__(out, batch_size, device, resume, progress, writers)
        self.model, self.methods, self.count, self.seed, self.target = model, dict(methods), count, seed, target
        self.identity, self.perturbation = dict(identity), dict(perturbation)
        self.preprocess, self.forward = preprocess, forward or (lambda model, x: model(x))

    def recorded(self):
        return dict(self.identity, methods=list(self.methods), images=self.count, data_seed=self.seed,
                    target=self.target, batch_size=self.batch_size, **self.perturbation)

    def items(self):
        return ROOT, [f'{i:06d}' for i in range(self.count)]

    def load(self, root, names, spans):
        return generated(self.seed, spans)

    def session(self, group):
        self._device = group.device
        self.model.to(group.device)
        return super().session(group)

    def compute(self, state, batch, indices, loaded, names):
        images, masks, labels = loaded
        x = images.to(self._device)
        x = self.preprocess(x) if self.preprocess is not None else x
        with torch.no_grad():
            logits = logits_of(self.forward(self.model, x))
        predicted = logits.argmax(1).cpu()
        target = labels.to(self._device) if self.target == 'label' else logits.argmax(1)
        explained = logits.gather(1, target[:, None])[:, 0].cpu()
        masks = masks.to(self._device)
        scores, curves = [{} for _ in indices], {}
        for name, method in self.methods.items():
            if self._device.type == 'cuda':
                torch.cuda.synchronize(self._device)
            began = time.perf_counter()
            relevance = method(self.model, x, target).detach()  # scored, not differentiated
            if self._device.type == 'cuda':
                torch.cuda.synchronize(self._device)
            seconds = (time.perf_counter() - began) / len(indices)
            if relevance.shape != x.shape:
                raise ValueError(f'method {name!r} returned relevance of shape {tuple(relevance.shape)} for an '
                                 f'input of shape {tuple(x.shape)}')
            result = faithfulness(self.model, x, relevance, target, forward=self.forward, progress=False,
                                  **self.perturbation)
            mass = relevance_mass_accuracy(relevance, masks).cpu()
            pointing = pointing_game(relevance, masks).cpu()
            curves[name] = torch.stack([result.morf.cpu(), result.lerf.cpu()], 1).float()
            curves[name + '.example'] = relevance[0].sum(0).float().cpu()
            for j in range(len(indices)):
                scores[j][name] = {'abpc': float(result.abpc[j]), 'morf_area': float(result.morf_area[j]),
                                   'lerf_area': float(result.lerf_area[j]), 'relevance_mass': _number(mass[j]),
                                   'pointing_game': _number(pointing[j]), 'seconds': seconds}
        rows = [{'path': names[i], 'image': i, 'label': int(labels[j]), 'predicted': int(predicted[j]),
                 'explained': int(target[j]), 'logit': float(explained[j]), 'scores': scores[j]}
                for j, i in enumerate(indices)]
        return (rows, curves), len(indices), []

    def write(self, batch, result, failures):
        rows, curves = result
        atomic_write(self.folder.path('curves', f'batch-{batch:07d}.pt'), lambda f: torch.save(curves, f))
        self.folder.write_part(batch, rows, failures)


def _number(value):
    value = float(value)
    return None if value != value else value  # NaN (no positive relevance) is recorded as null


def collect(out):
    """The results of a finished evaluation folder, per method.

    Parameters
    ----------
    out : str
        The folder an :class:`EvaluationJob` wrote.

    Returns
    -------
    results : list of MethodResult
        One per method, in the recorded order, over all images in their order (``example``: the first
        image's relevance summed over channels).
    rows : list of dict
        The index rows (``image``, ``label``, ``predicted``, ``explained``, ``logit``, ``scores``).
    settings : dict
        The recorded settings.

    Raises
    ------
    FileNotFoundError
        When the folder holds no finished evaluation.
    """
    index = os.path.join(out, INDEX_FILE)
    run = os.path.join(out, 'run.json')
    if not (os.path.isfile(index) and os.path.isfile(run)):
        raise FileNotFoundError(f'{out} holds no finished evaluation (no {INDEX_FILE})')
    with open(run, encoding='utf-8') as file:
        settings = json.load(file)['settings']
    with open(index, encoding='utf-8') as file:
        rows = [json.loads(line) for line in file]
    if len(rows) != settings['images']:
        raise FileNotFoundError(f'{out} holds {len(rows)} of {settings["images"]} images: run the evaluation to '
                                f'its end (the same command resumes it)')
    batches = -(-settings['images'] // settings['batch_size'])
    shards = [torch.load(os.path.join(out, 'curves', f'batch-{b:07d}.pt'), weights_only=True) for b in range(batches)]
    results = []
    for name in settings['methods']:
        curves = torch.cat([shard[name] for shard in shards])
        column = lambda key: torch.tensor([float('nan') if row['scores'][name][key] is None  # noqa: E731
                                           else row['scores'][name][key] for row in rows])
        whole = Faithfulness(settings['mode'], curves[:, 0], curves[:, 1])
        results.append(MethodResult(name, settings['mode'], whole.morf, whole.lerf, whole.abpc, whole.morf_area,
                                    whole.lerf_area, float(column('seconds').sum()), column('relevance_mass'),
                                    column('pointing_game'), shards[0][name + '.example']))
    return results, rows, settings
