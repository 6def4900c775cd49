"""``ExplainJob``: attribute a set of image files and write heatmaps, relevance and an index.

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


class ExplainJob:
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

    def __init__(self, model, composite, settings, forward=None):
        if not isinstance(settings, JobSettings):
            raise TypeError(f'settings must be a JobSettings, got {type(settings).__name__}')
        self.model, self.composite, self.settings, self.forward = model, composite, settings, forward
        self.folder = OutputFolder(settings.out)
        self.mean = torch.tensor(settings.mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(settings.std, dtype=torch.float32).view(1, -1, 1, 1)
        self.chunk = settings.batch_size  # attribution chunk; halved on out-of-memory

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

    def run(self):
        """Explain every input not finished by an earlier run, then merge the index.

        Under ``torchrun`` every process calls it; rank 0 prepares the folder and merges the index.

        Returns
        -------
        Summary
            This process's work and the job's failures (the same ``failures`` in every rank).

        Raises
        ------
        FileNotFoundError
            An input does not exist, or no image was found.
        SettingsMismatchError
            The output folder holds a run with other settings (or any run, with ``resume=False``).
        """
        from tqdm import tqdm

        group = Group(self.settings.device)
        try:
            return self._run(group, tqdm)
        finally:
            group.close()

    def _prepare(self, group):
        """Rank 0 checks (or records) the settings and removes the debris of killed runs while the other
        ranks wait, so nothing is removed that a rank of this run writes; all get its root, or its error."""
        root, names = job_inputs.collect(self.settings.inputs)
        outcome = None
        if group.rank == 0:
            try:
                outcome = ('root', self.folder.start(self.settings.recorded(), root, self.settings.resume))
            except SettingsMismatchError as error:
                outcome = ('refused', str(error))
        kind, value = group.broadcast(outcome)
        if kind == 'refused':
            raise SettingsMismatchError(value)
        if value != root:
            names = [os.path.relpath(os.path.join(root, name), value) for name in names]
        return value, names

    def _run(self, group, tqdm):
        settings = self.settings
        used_root, names = self._prepare(group)
        size = settings.batch_size
        dataset = job_inputs.ImageFiles(used_root, names, settings.size, settings.resize)
        batches = math.ceil(len(names) / size)
        mine = [b for b in range(group.rank, batches, group.world)]
        todo = []
        for b in mine:
            part = self.folder.read_part(b)
            if part is None or part[1]:  # unfinished, or with failures to retry
                todo.append(b)
        span = [list(range(b * size, min(len(names), (b + 1) * size))) for b in todo]
        skipped = sum(len(range(b * size, min(len(names), (b + 1) * size))) for b in mine) - sum(map(len, span))
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=span, num_workers=settings.workers,
                                             collate_fn=job_inputs.collate)
        dtype = DTYPES[settings.dtype]
        model = self.model.to(device=group.device, dtype=dtype)
        images_done = failed = 0
        start = time.perf_counter()
        bar = tqdm(total=sum(map(len, span)), unit='img', desc=f'explaining (rank {group.rank})' if group.world > 1
                   else 'explaining', disable=not settings.progress or (group.rank != 0), file=sys.stderr,
                   dynamic_ncols=True)
        pending = []
        with concurrent.futures.ThreadPoolExecutor(max_workers=settings.writers) as pool, \
                Explainer(model, self.composite, self.forward) as explainer:
            for b, (indices, images, loaded, errors) in zip(todo, loader):
                failures = [{'path': names[i], 'error': errors[i]} for i in indices if i in errors]
                for failure in failures:
                    tqdm.write(f'failed: {os.path.join(used_root, failure["path"])}: {failure["error"]}',
                               file=sys.stderr)
                tic = time.perf_counter()
                if images is not None:
                    explanation = self._attribute(explainer, self._preprocess(images, group.device, dtype))
                    explanation = explanation._replace(**{field: value.detach().cpu() for field, value in
                                                          explanation._asdict().items() if torch.is_tensor(value)})
                    seconds = (time.perf_counter() - tic) / len(loaded)
                    batch_names = [names[i] for i in loaded]
                else:
                    explanation, seconds, batch_names = None, 0.0, []
                while len(pending) >= 2 * settings.writers:
                    pending.pop(0).result()
                pending.append(pool.submit(self._finish_batch, b, batch_names, images, explanation, seconds,
                                           failures))
                images_done += len(loaded)
                failed += len(failures)
                bar.update(len(indices))
                elapsed = time.perf_counter() - start
                bar.set_postfix(failed=failed, refresh=False)
                if elapsed > 0:
                    bar.set_description_str(f'explaining ({images_done / elapsed:.1f} img/s)'
                                            if group.world == 1 else
                                            f'rank {group.rank} ({images_done / elapsed:.1f} img/s)', refresh=False)
            for future in pending:
                future.result()
        bar.close()
        seconds = time.perf_counter() - start
        group.barrier()
        merged = None
        if group.rank == 0:
            _, failures = self.folder.merge(range(batches))
            merged = (len(failures), tuple((f['path'], f['error']) for f in failures[:SHOWN_FAILURES]))
        failures, shown = group.broadcast(merged)  # every rank reports, and exits with, the same outcome
        return Summary(images_done, skipped, failures, seconds, self.folder.out, shown)

    def _finish_batch(self, batch, names, images, explanation, seconds, failures):
        if explanation is None:
            self.folder.write_part(batch, [], failures)
        else:
            self._write_batch(batch, names, images, explanation, seconds, failures)


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


__all__ = ['ExplainJob', 'JobSettings', 'Summary', 'summary_text', 'RELEVANCE_FORMATS', 'DTYPES', 'is_out_of_memory']
