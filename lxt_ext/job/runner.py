"""``ExplainJob``: attribute a set of image files and write heatmaps, relevance and an index.

The global order of the inputs fixes the batches (batch ``b`` holds images ``b*B .. b*B+B-1``); a
process takes the batches ``b % world == rank``, so a run with N processes computes exactly the batches
of a run with one, and (with the same threads per process) the same relevance bit for bit. Images are
decoded in DataLoader workers while the model runs; outputs are written by a background thread while the
next batch is attributed, with at most a few batches in flight, so memory stays flat however many images
there are. A batch counts as finished when its index part exists (``outputs``); a rerun skips finished
batches and recomputes the rest whole (its finished images are rewritten identically), so a run killed at
any moment and resumed gives the outputs of an uninterrupted run. On out-of-memory the batch is attributed
in halves (a warning says so, and later batches keep the smaller size).
"""
import concurrent.futures
import math
import os
import sys
import time
import warnings
from typing import NamedTuple

import numpy as np
import torch

from ..explanation import Explainer
from ..visualization.image import save_heatmap
from . import inputs as job_inputs
from .distributed import Group
from .outputs import FAILURES_FILE, INDEX_FILE, OutputFolder, atomic_write

RELEVANCE_FORMATS = (None, 'npy', 'safetensors')
DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16, 'float64': torch.float64}


class Summary(NamedTuple):
    images: int      # images attributed by this process in this run
    skipped: int     # images of batches an earlier run had finished
    failures: int    # failures in the whole output folder (all ranks, all runs), once merged
    seconds: float
    out: str

    @property
    def images_per_second(self):
        return self.images / self.seconds if self.seconds > 0 else 0.0


def is_out_of_memory(error):
    if isinstance(error, torch.OutOfMemoryError):
        return True
    message = str(error)
    return isinstance(error, RuntimeError) and ('out of memory' in message or "can't allocate memory" in message)


class ExplainJob:
    """Explain image files with ``model`` and ``composite`` into the folder ``out`` (see the module doc
    and ``lxt_ext.job.outputs`` for the layout).

    ``inputs``: files, folders, globs or list files. ``size``, ``mean``, ``std``: the model's input size and
    normalisation (images are scaled to 0..1, resized to ``size`` unless ``resize='none'``, then
    normalised). ``settings``: what identifies the model and composite (recorded with the job's own
    settings; a resume with others is refused). ``target``: None (top class), an int, or ``top_k``.
    ``relevance``: None, ``'npy'`` or ``'safetensors'``. ``overlay``: heatmaps drawn over the image."""

    def __init__(self, model, composite, inputs, out, *, size, mean, std, settings, target=None, top_k=None,
                 batch_size=16, workers=2, device='cpu', dtype='float32', heatmaps=True, overlay=False,
                 relevance=None, cmap='coldnhot', resize='stretch', resume=True, forward=None, progress=True,
                 writers=2):
        if relevance not in RELEVANCE_FORMATS:
            raise ValueError(f'relevance must be one of {RELEVANCE_FORMATS}, got {relevance!r}')
        if relevance == 'safetensors':
            try:
                import safetensors  # noqa: F401
            except ImportError:
                raise ValueError('relevance shards in safetensors need the safetensors package '
                                 '(pip install safetensors); or store .npy files') from None
        if dtype not in DTYPES:
            raise ValueError(f'dtype must be one of {tuple(DTYPES)}, got {dtype!r}')
        if batch_size < 1:
            raise ValueError(f'batch_size must be positive, got {batch_size}')
        if target is not None and top_k is not None:
            raise ValueError('give either a target class or top_k, not both')
        self.model, self.composite, self.inputs, self.folder = model, composite, list(inputs), OutputFolder(out)
        self.size, self.resize = size, resize
        self.mean = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.target, self.top_k, self.batch_size, self.workers = target, top_k, batch_size, workers
        self.device, self.dtype = device, dtype
        self.heatmaps, self.overlay, self.relevance, self.cmap = heatmaps, overlay, relevance, cmap
        self.resume, self.forward, self.progress, self.writers = resume, forward, progress, writers
        self.settings = dict(settings, target=target, top_k=top_k, dtype=dtype, size=size, resize=resize,
                             mean=self.mean.flatten().tolist(), std=self.std.flatten().tolist(),
                             heatmaps=heatmaps, overlay=overlay, relevance=relevance, cmap=cmap)
        self.chunk = batch_size  # attribution chunk; halved on out-of-memory

    # -- outputs of one batch (run on a writer thread) --

    def _names(self, name):
        return [name] if self.top_k is None else [f'{name}.top{j}' for j in range(self.top_k)]

    def _write_batch(self, batch, names, images, explanation, seconds, failures):
        relevance = explanation.relevance.float().cpu()
        per_image = relevance if self.top_k is not None else relevance[:, None]
        target = explanation.target.cpu().view(len(names), -1)
        score = explanation.score.float().cpu().view(len(names), -1)
        predicted = explanation.output.float().argmax(1).cpu()
        rows, shard = [], {}
        for i, name in enumerate(names):
            for j, output_name in enumerate(self._names(name)):
                heatmap = None
                if self.heatmaps:
                    heatmap = os.path.join('heatmaps', output_name + '.png')
                    atomic_write(self.folder.path(heatmap), lambda f, r=per_image[i, j]: save_heatmap(
                        r, f, image=images[i] if self.overlay else None, cmap=self.cmap, overlay=self.overlay,
                        format='PNG', compress_level=1))  # fast zlib level: docs/benchmarks_notes.md
                stored = None
                if self.relevance == 'npy':
                    stored = os.path.join('relevance', output_name + '.npy')
                    atomic_write(self.folder.path(stored), lambda f, r=per_image[i, j]: np.save(f, r.numpy()))
                elif self.relevance == 'safetensors':
                    stored = f'relevance/batch-{batch:07d}.safetensors:{output_name}'
                    shard[output_name] = per_image[i, j].contiguous()
                row = {'path': name, 'predicted': int(predicted[i]), 'explained': int(target[i, j]),
                       'logit': float(score[i, j]), 'relevance_sum': float(per_image[i, j].double().sum()),
                       'seconds': seconds, 'heatmap': heatmap, 'relevance': stored}
                if self.top_k is not None:
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
                parts = [explainer(chunk, self.target, self.top_k) for chunk in x.split(self.chunk)]
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
        return type(parts[0])(*(torch.cat(fields) for fields in zip(*parts)))

    def _preprocess(self, images, device, dtype):
        x = (images - self.mean) / self.std
        return x.to(device=device, dtype=dtype, non_blocking=True)

    def run(self):
        from tqdm import tqdm

        group = Group(self.device)
        try:
            return self._run(group, tqdm)
        finally:
            group.close()

    def _run(self, group, tqdm):
        root, names = job_inputs.collect(self.inputs)
        used_root = self.folder.start(self.settings, root, self.resume)
        if used_root != root:
            names = [os.path.relpath(os.path.join(root, name), used_root) for name in names]
        dataset = job_inputs.ImageFiles(used_root, names, self.size, self.resize)
        batches = math.ceil(len(names) / self.batch_size)
        mine = [b for b in range(group.rank, batches, group.world)]
        todo = []
        for b in mine:
            part = self.folder.read_part(b)
            if part is None or part[1]:  # unfinished, or with failures to retry
                todo.append(b)
        span = [list(range(b * self.batch_size, min(len(names), (b + 1) * self.batch_size))) for b in todo]
        skipped = sum(len(range(b * self.batch_size, min(len(names), (b + 1) * self.batch_size)))
                      for b in mine) - sum(map(len, span))
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=span, num_workers=self.workers,
                                             collate_fn=job_inputs.collate)
        dtype = DTYPES[self.dtype]
        model = self.model.to(device=group.device, dtype=dtype)
        images_done = failed = 0
        start = time.perf_counter()
        bar = tqdm(total=sum(map(len, span)), unit='img', desc=f'explaining (rank {group.rank})' if group.world > 1
                   else 'explaining', disable=not self.progress or (group.rank != 0), file=sys.stderr,
                   dynamic_ncols=True)
        pending = []
        with concurrent.futures.ThreadPoolExecutor(max_workers=self.writers) as pool, \
                Explainer(model, self.composite, self.forward) as explainer:
            for b, (indices, images, loaded, errors) in zip(todo, loader):
                failures = [{'path': names[i], 'error': errors[i]} for i in indices if i in errors]
                for failure in failures:
                    tqdm.write(f'failed: {os.path.join(used_root, failure["path"])}: {failure["error"]}',
                               file=sys.stderr)
                tic = time.perf_counter()
                if images is not None:
                    explanation = self._attribute(explainer, self._preprocess(images, group.device, dtype))
                    explanation = type(explanation)(*(t.detach().cpu() for t in explanation))
                    seconds = (time.perf_counter() - tic) / len(loaded)
                    batch_names = [names[i] for i in loaded]
                else:
                    explanation, seconds, batch_names = None, 0.0, []
                while len(pending) >= 2 * self.writers:
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
        failures = 0
        if group.rank == 0:
            _, failures = self.folder.merge(range(batches))
        return Summary(images_done, skipped, failures, seconds, self.folder.out)

    def _finish_batch(self, batch, names, images, explanation, seconds, failures):
        if explanation is None:
            self.folder.write_part(batch, [], failures)
        else:
            self._write_batch(batch, names, images, explanation, seconds, failures)


def summary_text(summary, world=1):
    """The closing lines of a job for people."""
    lines = [f'explained {summary.images} images in {summary.seconds:.1f} s '
             f'({summary.images_per_second:.2f} images/s{" on this rank" if world > 1 else ""})'
             + (f'; {summary.skipped} skipped, finished by an earlier run' if summary.skipped else '')]
    if summary.failures:
        lines.append(f'{summary.failures} images failed: listed in {os.path.join(summary.out, FAILURES_FILE)}')
    lines.append(f'outputs: {summary.out} (index: {os.path.join(summary.out, INDEX_FILE)})')
    return '\n'.join(lines)


__all__ = ['ExplainJob', 'Summary', 'summary_text', 'RELEVANCE_FORMATS', 'DTYPES', 'is_out_of_memory']
