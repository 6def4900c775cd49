"""``JobSettings``: everything an ``ExplainJob`` needs besides the model and the composite, checked once
when it is made."""
import dataclasses
from typing import Any, Mapping, Optional, Sequence

import torch

from .inputs import RESIZE_MODES

RELEVANCE_FORMATS = (None, 'npy', 'safetensors')
DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16, 'float64': torch.float64}


@dataclasses.dataclass(frozen=True)
class JobSettings:
    """The settings of one ``ExplainJob`` (what ``lxt-ext explain`` builds from its arguments).

    Invalid values raise ``ValueError`` when the settings are made, before any file is read or written.

    Parameters
    ----------
    inputs : sequence of str
        Image files, folders (searched recursively), globs, or ``.txt``/``.lst`` files listing paths.
    out : str
        The output folder (layout in ``lxt_ext.job.outputs``).
    size : int
        The model's input size: images become ``3 x size x size``.
    mean, std : sequence of float or torch.Tensor
        The model's normalisation per channel, applied to images scaled to 0..1 (stored as tuples).
    identity : mapping, optional
        What identifies the model and the composite (name, weights hash, composite and its parameters); it
        is recorded in ``run.json`` with the job's own settings, and a resume with other values is refused.
    target : int, optional
        The class explained in every image; None explains each image's top class.
    top_k : int, optional
        Explain each image for its ``top_k`` top classes (exclusive with ``target``).
    batch_size : int, optional
        Images per batch; the batches also fix what a resume skips, whatever the number of processes.
    workers : int, optional
        DataLoader processes decoding images (0 decodes in the main process).
    device : str, optional
        The torch device; under ``torchrun`` a bare ``'cuda'`` means each process's local GPU.
    dtype : {'float32', 'bfloat16', 'float16', 'float64'}, optional
        The dtype of the model and the inputs while attributing; stored relevance is float32.
    heatmaps : bool, optional
        Write a heatmap PNG per image (and class).
    overlay : bool, optional
        Draw heatmaps over the image.
    relevance : {None, 'npy', 'safetensors'}, optional
        Also store the relevance: one ``.npy`` per image, or one safetensors shard per batch.
    cmap : str, optional
        A zennit colour map name for the heatmaps.
    resize : {'stretch', 'none'}, optional
        ``'stretch'`` resizes every image to ``size``; with ``'none'`` other sizes fail.
    resume : bool, optional
        Continue a run of the same settings in ``out``; False refuses a folder that holds any run.
    progress : bool, optional
        Show a progress bar (on rank 0).
    writers : int, optional
        Background threads writing outputs while the next batch is attributed.
    """

    inputs: Sequence[str]
    out: str
    size: int
    mean: Sequence[float]
    std: Sequence[float]
    identity: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    target: Optional[int] = None
    top_k: Optional[int] = None
    batch_size: int = 16
    workers: int = 2
    device: str = 'cpu'
    dtype: str = 'float32'
    heatmaps: bool = True
    overlay: bool = False
    relevance: Optional[str] = None
    cmap: str = 'coldnhot'
    resize: str = 'stretch'
    resume: bool = True
    progress: bool = True
    writers: int = 2

    def __post_init__(self):
        # Stored as tuples so that the settings cannot change under a running job.
        inputs = (self.inputs,) if isinstance(self.inputs, str) else self.inputs
        object.__setattr__(self, 'inputs', tuple(str(spec) for spec in inputs))
        for name in ('mean', 'std'):  # sequences or tensors of any shape, one value per channel
            values = torch.as_tensor(getattr(self, name), dtype=torch.float32).flatten().tolist()
            object.__setattr__(self, name, tuple(values))
        object.__setattr__(self, 'out', str(self.out))
        object.__setattr__(self, 'identity', dict(self.identity))
        if self.relevance not in RELEVANCE_FORMATS:
            raise ValueError(f'relevance must be one of {RELEVANCE_FORMATS}, got {self.relevance!r}')
        if self.relevance == 'safetensors':
            try:
                import safetensors  # noqa: F401
            except ImportError:
                raise ValueError('relevance shards in safetensors need the safetensors package '
                                 '(pip install safetensors); or store .npy files') from None
        if self.dtype not in DTYPES:
            raise ValueError(f'dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}')
        if self.resize not in RESIZE_MODES:
            raise ValueError(f'resize must be one of {RESIZE_MODES}, got {self.resize!r}')
        for name in ('batch_size', 'writers', 'size'):
            if getattr(self, name) < 1:
                raise ValueError(f'{name} must be positive, got {getattr(self, name)}')
        if self.workers < 0:
            raise ValueError(f'workers must be 0 or more, got {self.workers}')
        if self.target is not None and self.top_k is not None:
            raise ValueError('give either a target class or top_k, not both')
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f'top_k must be positive, got {self.top_k}')
        if not self.inputs:
            raise ValueError('no inputs given')

    def recorded(self):
        """The settings that fix the outputs, as recorded in ``run.json``.

        Returns
        -------
        dict
            ``identity`` with the target, dtype, size, resizing, normalisation, batch size (it fixes the
            batches a resume skips) and output choices; how the work is spread (workers, device, writers)
            is left out, so a resume may change it.
        """
        return dict(self.identity, target=self.target, top_k=self.top_k, dtype=self.dtype, size=self.size,
                    batch_size=self.batch_size,
                    resize=self.resize, mean=list(self.mean), std=list(self.std), heatmaps=self.heatmaps,
                    overlay=self.overlay, relevance=self.relevance, cmap=self.cmap)
