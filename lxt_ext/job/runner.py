"""The job runner (``BatchJob``) and ``ExplainJob``, which attributes a set of image files and writes heatmaps,
relevance and an index (``lxt_ext.job.evaluation.EvaluationJob`` runs on the same runner).

The global order of the inputs fixes the batches (batch ``b`` holds images ``b*B .. b*B+B-1``); a
process takes the batches ``b % world == rank``, so a run with N processes computes exactly the batches
of a run with one, and (with the same threads per process) the same relevance bit for bit. Images are
decoded in DataLoader workers while the model runs; outputs are written by a background thread while the
next batch is attributed, with at most a few batches in flight, so memory stays flat however many images
there are. A batch counts as finished when its index part exists (``outputs``); a rerun skips finished
batches and recomputes the rest whole (its finished images are rewritten identically), so a run killed at
any moment and resumed gives the outputs of an uninterrupted run; rank 0 removes the temporary files of
killed runs before any rank writes. On out-of-memory the batch is attributed in halves (a warning says
so, and later batches keep the smaller size).

Unreadable inputs are reported (printed as they fail, listed in ``failures.jsonl`` and named in the
summary), not a failure of the job: after the index merge rank 0 hands the count to every rank, so all
ranks return the same ``Summary`` and, with ``--strict``, the CLI exits 1 in every rank alike.
"""
import concurrent.futures
import contextlib
import math
import os
import sys
import time
import warnings
from typing import NamedTuple, Tuple

import numpy as np
import torch

from ..attribution import Explainer, concatenate
from ..visualization.image import save_heatmap
from . import inputs as job_inputs
from .distributed import Group
from .outputs import FAILURES_FILE, INDEX_FILE, OutputFolder, SettingsMismatchError, atomic_write
from .settings import DTYPES, RELEVANCE_FORMATS, JobSettings


class Summary(NamedTuple):
    """What one process did in a run, and the outcome of the whole job (the same in every rank).

    Parameters
    ----------
    images : int
        Images attributed by this process in this run.
    skipped : int
        Images of this process's batches that an earlier run had finished.
    failures : int
        Inputs that failed in the whole output folder (all ranks, all runs), once merged.
    seconds : float
        This process's time for the run.
    out : str
        The output folder.
    failed : tuple of (str, str), optional
        ``(path, error)`` of the first failures (up to ``SHOWN_FAILURES``), in the order of the inputs.
    """

    images: int
    skipped: int
    failures: int
    seconds: float
    out: str
    failed: Tuple[Tuple[str, str], ...] = ()

    @property
    def images_per_second(self):
        """This process's images per second (0 for no time)."""
        return self.images / self.seconds if self.seconds > 0 else 0.0


SHOWN_FAILURES = 10  # failures named in the summary; failures.jsonl lists them all


def is_out_of_memory(error):
    """Whether ``error`` is an out-of-memory error of some device.

    Parameters
    ----------
    error : BaseException
        The error raised by an attribution.

    Returns
    -------
    bool
        True for ``torch.OutOfMemoryError`` and allocation failures reported as RuntimeError.
    """
    if isinstance(error, torch.OutOfMemoryError):
        return True
    message = str(error)
    return isinstance(error, RuntimeError) and ('out of memory' in message or "can't allocate memory" in message)


class BatchJob:
    """The job runner: items in fixed batches, spread over the processes of a job, into an output folder.

    The global order of the items fixes the batches (batch ``b`` holds items ``b*B .. b*B+B-1``); a process
    takes the batches ``b % world == rank`` and skips those an earlier run finished (their index part
    exists); the rest are loaded, computed in this thread and written by background threads (a few batches
    in flight), then rank 0 merges the index. What the items are and what is computed and written is the
    subclasses' (:class:`ExplainJob`: image files into heatmaps; ``lxt_ext.job.evaluation.EvaluationJob``:
    generated images into faithfulness scores).

    Parameters
    ----------
    out : str
        The output folder.
    batch_size : int
        Items per batch (recorded: it fixes the batches a resume skips).
    device : str
        The torch device (under ``torchrun`` a bare ``'cuda'`` is each process's local GPU).
    resume : bool, optional
        Whether a folder holding a run of the same settings may be continued.
    progress : bool, optional
        Show a progress bar (rank 0).
    writers : int, optional
        Background threads writing outputs.
    """

    verb, unit = 'processing', 'item'  # the progress bar's words

    def __init__(self, out, batch_size, device, resume=True, progress=True, writers=2):
        self.folder = OutputFolder(out)
        self.batch_size, self.device, self.resume = batch_size, device, resume
        self.progress, self.writers = progress, writers

    # -- what a subclass defines --

    def recorded(self):
        """The settings that fix the outputs, recorded in ``run.json`` (a resume with others is refused)."""
        raise NotImplementedError

    def items(self):
        """``(root, names)``: the items in their global order, named relative to ``root``."""
        raise NotImplementedError

    def load(self, root, names, spans):
        """One loaded batch per span (the item indices of each batch to compute), in order."""
        raise NotImplementedError

    def compute(self, state, batch, indices, loaded, names):
        """``(result, done, failures)`` of one loaded batch: what ``write`` gets, how many items were
        computed, and failure rows (``path``, ``error``)."""
        raise NotImplementedError

    def write(self, batch, result, failures):
        """Write a batch's outputs, then its index part (``self.folder.write_part``); on a writer thread."""
        raise NotImplementedError

    def session(self, group):
        """A context manager around the computation of this process's batches; ``compute`` gets what it
        enters to (default: nothing)."""
        return contextlib.nullcontext()

    # -- the run --

    def run(self):
        """Compute every batch not finished by an earlier run, then merge the index.

        Under ``torchrun`` every process calls it; rank 0 prepares the folder and merges the index.

        Returns
        -------
        Summary
            This process's work and the job's failures (the same ``failures`` in every rank).

        Raises
        ------
        FileNotFoundError
            An input does not exist, or no item was found.
        SettingsMismatchError
            The output folder holds a run with other settings (or any run, with ``resume=False``).
        """
        from tqdm import tqdm

        group = Group(self.device)
        try:
            return self._run(group, tqdm)
        finally:
            group.close()

    def _prepare(self, group):
        """Rank 0 checks (or records) the settings and removes the debris of killed runs while the other
        ranks wait, so nothing is removed that a rank of this run writes; all get its root, or its error."""
        root, names = self.items()
        outcome = None
        if group.rank == 0:
            try:
                outcome = ('root', self.folder.start(self.recorded(), root, self.resume))
            except SettingsMismatchError as error:
                outcome = ('refused', str(error))
        kind, value = group.broadcast(outcome)
        if kind == 'refused':
            raise SettingsMismatchError(value)
        if value != root:
            names = [os.path.relpath(os.path.join(root, name), value) for name in names]
        return value, names

    def _run(self, group, tqdm):
        used_root, names = self._prepare(group)
        size = self.batch_size
        batches = math.ceil(len(names) / size)
        mine = [b for b in range(group.rank, batches, group.world)]
        todo = []
        for b in mine:
            part = self.folder.read_part(b)
            if part is None or part[1]:  # unfinished, or with failures to retry
                todo.append(b)
        span = [list(range(b * size, min(len(names), (b + 1) * size))) for b in todo]
        skipped = sum(len(range(b * size, min(len(names), (b + 1) * size))) for b in mine) - sum(map(len, span))
        done = failed = 0
        start = time.perf_counter()
        verb = self.verb if group.world == 1 else f'rank {group.rank}'
        bar = tqdm(total=sum(map(len, span)), unit=self.unit, desc=verb,
                   disable=not self.progress or (group.rank != 0), file=sys.stderr, dynamic_ncols=True)
        pending = []
        with concurrent.futures.ThreadPoolExecutor(max_workers=self.writers) as pool, self.session(group) as state:
            for b, indices, loaded in zip(todo, span, self.load(used_root, names, span)):
                result, computed, failures = self.compute(state, b, indices, loaded, names)
                for failure in failures:
                    tqdm.write(f'failed: {os.path.join(used_root, failure["path"])}: {failure["error"]}',
                               file=sys.stderr)
                while len(pending) >= 2 * self.writers:
                    pending.pop(0).result()
                pending.append(pool.submit(self.write, b, result, failures))
                done += computed
                failed += len(failures)
                bar.update(len(indices))
                elapsed = time.perf_counter() - start
                bar.set_postfix(failed=failed, refresh=False)
                if elapsed > 0:
                    bar.set_description_str(f'{verb} ({done / elapsed:.1f} {self.unit}/s)', refresh=False)
            for future in pending:
                future.result()
        bar.close()
        seconds = time.perf_counter() - start
        group.barrier()
        merged = None
        if group.rank == 0:
            _, failures = self.folder.merge(range(batches))
            merged = (len(failures), tuple((f['path'], f['error']) for f in failures[:SHOWN_FAILURES]))
            self.merged(used_root, names)
        failures, shown = group.broadcast(merged)  # every rank reports, and exits with, the same outcome
        return Summary(done, skipped, failures, seconds, self.folder.out, shown)

    def merged(self, root, names):
        """Called in rank 0 after the index merge (default: nothing), e.g. to write a report."""


class ExplainJob(BatchJob):
    """Explain image files with a model and a composite into an output folder.

    See the module doc, and ``lxt_ext.job.outputs`` for the layout of the folder.

    Parameters
    ----------
    model : torch.nn.Module
        The classifier, in eval mode; moved to the settings' device and dtype.
    composite : zennit.core.Composite
        The attribution method (lxt_ext's or zennit's composites).
    settings : JobSettings
        Inputs, output folder, preprocessing, target and outputs.
    forward : callable, optional
        ``forward(model, x) -> logits`` for models whose call does not return the logits (e.g. Hugging
        Face models); None calls ``model(x)``.
    """

    verb, unit = 'explaining', 'img'

    def __init__(self, model, composite, settings, forward=None):
        if not isinstance(settings, JobSettings):
            raise TypeError(f'settings must be a JobSettings, got {type(settings).__name__}')
        super().__init__(settings.out, settings.batch_size, settings.device, settings.resume, settings.progress,
                         settings.writers)
        self.model, self.composite, self.settings, self.forward = model, composite, settings, forward
        self.mean = torch.tensor(settings.mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(settings.std, dtype=torch.float32).view(1, -1, 1, 1)
        self.chunk = settings.batch_size  # attribution chunk; halved on out-of-memory

    def recorded(self):
        return self.settings.recorded()

    def items(self):
        return job_inputs.collect(self.settings.inputs)

    def load(self, root, names, spans):
        dataset = job_inputs.ImageFiles(root, names, self.settings.size, self.settings.resize)
        return torch.utils.data.DataLoader(dataset, batch_sampler=spans, num_workers=self.settings.workers,
                                           collate_fn=job_inputs.collate)

    @contextlib.contextmanager
    def session(self, group):
        self._device, self._dtype = group.device, DTYPES[self.settings.dtype]
        model = self.model.to(device=group.device, dtype=self._dtype)
        with Explainer(model, self.composite, self.forward) as explainer:
            yield explainer

    def compute(self, explainer, batch, indices, loaded, names):
        _, images, done, errors = loaded
        failures = [{'path': names[i], 'error': errors[i]} for i in indices if i in errors]
        if images is None:
            return (images, None, 0.0, []), 0, failures
        tic = time.perf_counter()
        explanation = self._attribute(explainer, self._preprocess(images, self._device, self._dtype))
        explanation = explanation._replace(**{field: value.detach().cpu() for field, value in
                                              explanation._asdict().items() if torch.is_tensor(value)})
        seconds = (time.perf_counter() - tic) / len(done)
        return (images, explanation, seconds, [names[i] for i in done]), len(done), failures

    def write(self, batch, result, failures):
        images, explanation, seconds, names = result
        if explanation is None:
            self.folder.write_part(batch, [], failures)
        else:
            self._write_batch(batch, names, images, explanation, seconds, failures)

    # -- outputs of one batch (run on a writer thread) --

    def _names(self, name):
        top_k = self.settings.top_k
        return [name] if top_k is None else [f'{name}.top{j}' for j in range(top_k)]

    def _write_batch(self, batch, names, images, explanation, seconds, failures):
        settings = self.settings
        relevance = explanation.relevance.float().cpu()
        per_image = relevance if settings.top_k is not None else relevance[:, None]
        target = explanation.target.cpu().view(len(names), -1)
        score = explanation.score.float().cpu().view(len(names), -1)
        predicted = explanation.output.float().argmax(1).cpu()
        rows, shard = [], {}
        for i, name in enumerate(names):
            for j, output_name in enumerate(self._names(name)):
                heatmap = None
                if settings.heatmaps:
                    heatmap = os.path.join('heatmaps', output_name + '.png')
                    atomic_write(self.folder.path(heatmap), lambda f, r=per_image[i, j]: save_heatmap(
                        r, f, image=images[i] if settings.overlay else None, cmap=settings.cmap,
                        overlay=settings.overlay, format='PNG',
                        compress_level=1))  # fast zlib level: docs/benchmarks_notes.md
                stored = None
                if settings.relevance == 'npy':
                    stored = os.path.join('relevance', output_name + '.npy')
                    atomic_write(self.folder.path(stored), lambda f, r=per_image[i, j]: np.save(f, r.numpy()))
                elif settings.relevance == 'safetensors':
                    stored = f'relevance/batch-{batch:07d}.safetensors:{output_name}'
                    shard[output_name] = per_image[i, j].contiguous()
                row = {'path': name, 'predicted': int(predicted[i]), 'explained': int(target[i, j]),
                       'logit': float(score[i, j]), 'relevance_sum': float(per_image[i, j].double().sum()),
                       'seconds': seconds, 'heatmap': heatmap, 'relevance': stored}
                if settings.top_k is not None:
                    row['rank'] = j
                rows.append(row)
        if shard:
            from safetensors.torch import save

            data = save(shard)
            atomic_write(self.folder.path('relevance', f'batch-{batch:07d}.safetensors'), lambda f: f.write(data))
        self.folder.write_part(batch, rows, failures)

    # -- attribution --

    def _attribute(self, explainer, x):
        """The batch's Explanation, in chunks of ``self.chunk`` rows (halved on out-of-memory)."""
        while True:
            try:
                parts = [explainer(chunk, self.settings.target, self.settings.top_k) for chunk in x.split(self.chunk)]
                break
            except Exception as error:  # noqa: BLE001 (only out-of-memory is handled)
                if not is_out_of_memory(error) or self.chunk == 1:
                    raise
                self.chunk = max(1, self.chunk // 2)
                if x.device.type == 'cuda':
                    torch.cuda.empty_cache()
                warnings.warn(f'out of memory: attributing in batches of {self.chunk} from now on')
        if len(parts) == 1:
            return parts[0]
        return concatenate(parts)

    def _preprocess(self, images, device, dtype):
        x = (images - self.mean) / self.std
        return x.to(device=device, dtype=dtype, non_blocking=True)


def summary_text(summary, world=1):
    """The closing lines of a job for people: images, images/s, failures (the first ones named), outputs.

    Parameters
    ----------
    summary : Summary
        What ``ExplainJob.run`` returned.
    world : int, optional
        The number of processes of the job (images/s are then this rank's).

    Returns
    -------
    str
        Lines joined by newlines.
    """
    lines = [f'explained {summary.images} images in {summary.seconds:.1f} s '
             f'({summary.images_per_second:.2f} images/s{" on this rank" if world > 1 else ""})'
             + (f'; {summary.skipped} skipped, finished by an earlier run' if summary.skipped else '')]
    if summary.failures:
        lines.append(f'{summary.failures} images failed, not explained (all listed in '
                     f'{os.path.join(summary.out, FAILURES_FILE)}):')
        lines += [f'  {path}: {error}' for path, error in summary.failed]
        if summary.failures > len(summary.failed):
            lines.append(f'  ... and {summary.failures - len(summary.failed)} more')
    lines.append(f'outputs: {summary.out} (index: {os.path.join(summary.out, INDEX_FILE)})')
    return '\n'.join(lines)


__all__ = ['BatchJob', 'ExplainJob', 'JobSettings', 'Summary', 'summary_text', 'RELEVANCE_FORMATS', 'DTYPES',
           'is_out_of_memory']
