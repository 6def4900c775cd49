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

Every file is written to a temporary name in its folder (``.tmp-<random>-<name>.tmp``) and renamed into
place, so a process killed at any moment leaves each output either complete or absent, and perhaps
temporary files: a run that finds a recorded run removes those before any process writes (``clean``).
"""
import hashlib
import json
import os
import tempfile

from .._docstrings import shared_parameters

RUN_FILE = 'run.json'
INDEX_FILE = 'index.jsonl'
FAILURES_FILE = 'failures.jsonl'
# Temporary files start and end so; no output name ends in '.tmp' (outputs end in .png, .npy,
# .safetensors, .json or .jsonl), so removing them can never remove an output, whatever the inputs' names.
TEMPORARY_PREFIX, TEMPORARY_SUFFIX = '.tmp-', '.tmp'


class SettingsMismatchError(RuntimeError):
    """The output folder holds a run made with other settings: resuming would mix outputs."""


def atomic_write(path, write):
    """Write a file so that it is either complete or absent, whenever the process dies.

    Parameters
    ----------
    path : str
        The file to write.
    write : callable
        ``write(file_object)`` writes the content into a temporary file beside ``path``, which is then
        renamed to ``path``.
    """
    folder = os.path.dirname(path) or '.'
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=TEMPORARY_PREFIX,
                                         suffix=f'-{os.path.basename(path)}{TEMPORARY_SUFFIX}')
    try:
        with os.fdopen(handle, 'wb') as file:
            write(file)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def is_temporary(name):
    """Whether the file name ``name`` is one of ``atomic_write``'s temporary files.

    Parameters
    ----------
    name : str
        A file name (no folder).

    Returns
    -------
    bool
        True for names made by ``atomic_write`` for its temporary files.
    """
    return name.startswith(TEMPORARY_PREFIX) and name.endswith(TEMPORARY_SUFFIX)


def settings_hash(settings):
    """The sha256 of ``settings`` as sorted JSON (what ``run.json`` records to compare runs).

    Parameters
    ----------
    settings : dict
        JSON-serialisable settings.

    Returns
    -------
    str
        Hex digest.
    """
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def file_sha256(path):
    """The sha256 of a file's content, read in blocks.

    Parameters
    ----------
    path : str
        The file.

    Returns
    -------
    str
        Hex digest.
    """
    digest = hashlib.sha256()
    with open(path, 'rb') as file:
        for block in iter(lambda: file.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def _jsonl(rows):
    return ''.join(json.dumps(row, sort_keys=True) + '\n' for row in rows).encode()


class OutputFolder:
    """The folder ``out`` of one job (see the module doc).

    Parameters
    ----------
    out : str
        The folder; made when the first file is written.
    """

    def __init__(self, out):
        self.out = out

    def path(self, *parts):
        """A path inside the folder.

        Parameters
        ----------
        *parts : str
            Path components below ``out``.

        Returns
        -------
        str
            ``out`` joined with ``parts``.
        """
        return os.path.join(self.out, *parts)

    def start(self, settings, root, resume=True):
        """Record the settings, or check them against the recorded ones.

        A folder made with other settings is refused (``SettingsMismatchError`` naming the differences);
        ``resume=False`` refuses any earlier run there. The root of an earlier run is kept when every
        input lies under it (a resume with fewer or more inputs names outputs as before). Temporary files
        of an earlier, killed run are removed (``clean``): call this in one process only, before any
        process writes outputs.

        Parameters
        ----------
        settings : dict
            The settings that fix the outputs (``JobSettings.recorded``), JSON-serialisable.
        root : str
            The deepest folder holding all inputs of this run.
        resume : bool, optional
            Whether a folder holding a run of the same settings may be continued.

        Returns
        -------
        str
            The input root to name outputs by.
        """
        recorded = self.recorded()
        if recorded is None:
            self.clean()  # a run killed while writing run.json
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
        self.clean()
        old_root = recorded['root']
        return old_root if os.path.commonpath([old_root, root]) == old_root else root

    def clean(self):
        """Remove the temporary files that killed runs left anywhere in the folder.

        Only safe while no process of this folder is writing: a job calls it in rank 0 before the
        other ranks start (``start``).

        Returns
        -------
        int
            How many files were removed.
        """
        removed = 0
        if not os.path.isdir(self.out):
            return removed
        for folder, _, files in os.walk(self.out):
            for name in files:
                if is_temporary(name):
                    try:
                        os.unlink(os.path.join(folder, name))
                        removed += 1
                    except FileNotFoundError:  # removed meanwhile by someone else cleaning: the same end
                        pass
        return removed

    def recorded(self):
        """What ``run.json`` holds, or None where there is none.

        Returns
        -------
        dict or None
            ``settings``, ``hash`` and ``root`` of the recorded run.
        """
        path = self.path(RUN_FILE)
        if not os.path.exists(path):
            return None
        try:
            with open(path, encoding='utf-8') as file:
                return json.load(file)
        except (OSError, ValueError) as error:
            raise SettingsMismatchError(f'{path} is unreadable ({error}); it was not written by lxt-ext explain, '
                                        f'or was damaged: choose another output folder') from None

    @shared_parameters('batch_number')
    def part_path(self, batch):
        """The index part of a batch.

        Returns
        -------
        str
            ``parts/batch-<b>.jsonl`` inside the folder.
        """
        return self.path('parts', f'batch-{batch:07d}.jsonl')

    @shared_parameters('batch_number')
    def read_part(self, batch):
        """The index rows and failures of a finished batch.

        Returns
        -------
        tuple of (list of dict, list of dict) or None
            ``(rows, failures)``, or None where the batch is not finished.
        """
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
        """Mark a batch finished, with its index rows and failures (write it after its other outputs).

        Parameters
        ----------
        batch : int
            The batch number.
        rows, failures : iterable of dict
            The batch's index rows and failure rows.
        """
        atomic_write(self.part_path(batch), lambda f: f.write(_jsonl(list(rows) + list(failures))))

    def merge(self, batches):
        """Write ``index.jsonl`` and ``failures.jsonl`` from the parts of ``batches``, in that order.

        Parameters
        ----------
        batches : iterable of int
            The batch numbers; batches without a part are left out.

        Returns
        -------
        tuple of (int, list of dict)
            How many index rows, and the failure rows (``path``, ``error``).
        """
        rows, failures = [], []
        for batch in batches:
            part = self.read_part(batch)
            if part is not None:
                rows += part[0]
                failures += part[1]
        atomic_write(self.path(INDEX_FILE), lambda f: f.write(_jsonl(rows)))
        atomic_write(self.path(FAILURES_FILE), lambda f: f.write(_jsonl(failures)))
        return len(rows), failures
