"""The output folder of a job: atomic files, the run's settings, per-batch index parts and the merged index.

Layout (``out/``)::

    run.json                  the settings (model and weights hash, composite and parameters, target,
                              dtype, size), their hash, the input root
    heatmaps/<name>.png       per image (``<name>.top<j>.png`` per class with top-k)
    relevance/<name>.npy      per image, float32 (C, H, W) (``--relevance npy``), or
    relevance/batch-<b>.safetensors   one shard per batch, one tensor per image name (``safetensors``)
    parts/batch-<b>.jsonl     the index rows and failures of batch b, written after everything else of
                              the batch: a batch is finished exactly when its part exists
    index.jsonl, failures.jsonl   all parts merged in the global order of the inputs

``<name>`` is the image's path relative to the input root, suffix kept (``a/x.jpg`` ->
``heatmaps/a/x.jpg.png``). Index rows: ``path``, ``predicted`` (top class), ``explained`` (the class
explained), ``logit`` (its logit), ``relevance_sum``, ``seconds`` (the batch's attribution time per
image), ``heatmap`` and ``relevance`` (output paths relative to ``out``, or null), and with top-k
``rank`` (0 = top class). Failure rows: ``path``, ``error``.

Every file is written to a temporary name in its folder and renamed into place, so a process killed at
any moment leaves each output either complete or absent.
"""
import hashlib
import json
import os
import tempfile

RUN_FILE = 'run.json'
INDEX_FILE = 'index.jsonl'
FAILURES_FILE = 'failures.jsonl'


class SettingsMismatchError(RuntimeError):
    """The output folder holds a run made with other settings: resuming would mix outputs."""


def atomic_write(path, write):
    """``write(file_object)`` into a temporary file beside ``path``, then rename it to ``path``."""
    folder = os.path.dirname(path) or '.'
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=folder, prefix='.tmp-', suffix='-' + os.path.basename(path))
    try:
        with os.fdopen(handle, 'wb') as file:
            write(file)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def settings_hash(settings):
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, 'rb') as file:
        for block in iter(lambda: file.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def _jsonl(rows):
    return ''.join(json.dumps(row, sort_keys=True) + '\n' for row in rows).encode()


class OutputFolder:
    """The folder ``out`` of one job (see the module doc)."""

    def __init__(self, out):
        self.out = out

    def path(self, *parts):
        return os.path.join(self.out, *parts)

    def start(self, settings, root, resume=True):
        """Record the settings, or check them against the recorded ones; returns the input root to use.

        A folder made with other settings is refused (``SettingsMismatchError`` naming the differences);
        ``resume=False`` refuses any earlier run there. The root of an earlier run is kept when every
        input lies under it (a resume with fewer or more inputs names outputs as before)."""
        recorded = self.recorded()
        if recorded is None:
            atomic_write(self.path(RUN_FILE), lambda f: f.write(json.dumps(
                {'settings': settings, 'hash': settings_hash(settings), 'root': root}, indent=1,
                sort_keys=True).encode()))
            return root
        if not resume:
            raise SettingsMismatchError(f'{self.out} already holds a run ({RUN_FILE}); resume is off, so choose '
                                        f'another output folder')
        if recorded.get('hash') != settings_hash(settings):
            old = recorded.get('settings', {})
            changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            details = '; '.join(f'{k}: {old.get(k)!r} -> {settings.get(k)!r}' for k in changed)
            raise SettingsMismatchError(
                f'{self.out} holds a run with other settings ({details}); resuming would mix outputs. Use the '
                f'same settings to resume, or another output folder')
        old_root = recorded['root']
        return old_root if os.path.commonpath([old_root, root]) == old_root else root

    def recorded(self):
        path = self.path(RUN_FILE)
        if not os.path.exists(path):
            return None
        try:
            with open(path, encoding='utf-8') as file:
                return json.load(file)
        except (OSError, ValueError) as error:
            raise SettingsMismatchError(f'{path} is unreadable ({error}); it was not written by lxt-ext explain, '
                                        f'or was damaged: choose another output folder') from None

    def part_path(self, batch):
        return self.path('parts', f'batch-{batch:07d}.jsonl')

    def read_part(self, batch):
        """``(rows, failures)`` of a finished batch, or None."""
        path = self.part_path(batch)
        if not os.path.exists(path):
            return None
        rows, failures = [], []
        with open(path, encoding='utf-8') as file:
            for line in file:
                row = json.loads(line)
                (failures if 'error' in row else rows).append(row)
        return rows, failures

    def write_part(self, batch, rows, failures):
        atomic_write(self.part_path(batch), lambda f: f.write(_jsonl(list(rows) + list(failures))))

    def merge(self, batches):
        """Write ``index.jsonl`` and ``failures.jsonl`` from the parts of ``batches`` (in that order);
        returns ``(rows, failures)`` counts. Batches without a part are left out."""
        rows, failures = [], []
        for batch in batches:
            part = self.read_part(batch)
            if part is not None:
                rows += part[0]
                failures += part[1]
        atomic_write(self.path(INDEX_FILE), lambda f: f.write(_jsonl(rows)))
        atomic_write(self.path(FAILURES_FILE), lambda f: f.write(_jsonl(failures)))
        return len(rows), len(failures)
