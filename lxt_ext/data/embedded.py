"""lxt_ext's embedded default model: a small Vision Transformer trained on procedural shapes, with
held-out sample images and their ground-truth object masks, shipped inside the package (offline).

The model is torchvision's ``VisionTransformer`` (``IMAGE_SIZE`` x ``IMAGE_SIZE`` RGB, patch 8,
4 blocks) that tells the shape classes ``CLASSES`` apart on textured backgrounds with a distractor
bar; :mod:`lxt_ext.data.shapes` draws the images and ``python/training/train_default_model.py`` trains it
and writes the files of ``embedded/``: ``model.pt`` (float32 state_dict), ``model.json`` (architecture,
classes, normalisation, held-out accuracy, how it was trained), ``samples/`` (the images),
``masks/`` (one mask PNG per image, white = object) and ``samples.json`` (labels).

::

    from lxt_ext.data import embedded

    model = embedded.load_model()                       # eval mode, sha256-checked weights
    images, masks, labels, names = embedded.load_samples()
    logits = model((images - embedded.MEAN) / embedded.STD)
"""
import hashlib
import json
import os

import torch

__all__ = ['FOLDER', 'SAMPLES_DIR', 'MASKS_DIR', 'WEIGHTS', 'WEIGHTS_SHA256', 'IMAGE_SIZE', 'CLASSES', 'MEAN', 'STD',
           'HELD_OUT_ACCURACY', 'EmbeddedModelError', 'load_model', 'load_samples']

FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'embedded')
SAMPLES_DIR = os.path.join(FOLDER, 'samples')
MASKS_DIR = os.path.join(FOLDER, 'masks')
WEIGHTS = os.path.join(FOLDER, 'model.pt')
# The sha256 of model.pt as trained; python/training/train_default_model.py rewrites this line.
WEIGHTS_SHA256 = '8fb3945ec8de6651a0331d8f830eea32c1df2e6e33537bf65e8dde0f9462966f'


class EmbeddedModelError(RuntimeError):
    """A file of the embedded model is missing, corrupt or not the one this lxt_ext shipped with."""


def _read_json(name):
    path = os.path.join(FOLDER, name)
    try:
        with open(path) as file:
            return json.load(file)
    except FileNotFoundError:
        raise EmbeddedModelError(f'{path} is missing: the package was installed without its data files '
                                 f'(package_data), or they were deleted; reinstall lxt_ext') from None
    except json.JSONDecodeError as error:
        raise EmbeddedModelError(f'{path} is corrupt ({error}); reinstall lxt_ext') from None


_METADATA = _read_json('model.json')
IMAGE_SIZE = _METADATA['architecture']['image_size']
CLASSES = tuple(_METADATA['classes'])
# The normalisation the model expects (callers apply it): (1, 3, 1, 1), x = (pixels in 0..1 - MEAN) / STD.
MEAN = torch.tensor(_METADATA['mean']).view(1, 3, 1, 1)
STD = torch.tensor(_METADATA['std']).view(1, 3, 1, 1)
HELD_OUT_ACCURACY = _METADATA['held_out_accuracy']


def _verified_bytes(path, sha256):
    try:
        with open(path, 'rb') as file:
            data = file.read()
    except FileNotFoundError:
        raise EmbeddedModelError(f'the embedded model weights {path} are missing: the package was installed '
                                 f'without its data files (package_data), or they were deleted; reinstall '
                                 f'lxt_ext') from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise EmbeddedModelError(f'the embedded model weights {path} are corrupt or not the shipped file: '
                                 f'sha256 {digest}, expected {sha256}; reinstall lxt_ext (or, after retraining '
                                 f'with python/training/train_default_model.py, use the checkout it wrote to)')
    return data


def load_model(path=WEIGHTS, sha256=WEIGHTS_SHA256):
    """The embedded ``torchvision.models.VisionTransformer`` in eval mode on the CPU, float32, its
    weights read from ``path`` after checking the file's sha256 (:class:`EmbeddedModelError` if the
    file is missing or its checksum differs).

    Parameters
    ----------
    path : str, optional
        The state_dict file (default ``WEIGHTS``, the shipped one).
    sha256 : str, optional
        Its expected sha256 in hex (default ``WEIGHTS_SHA256``).

    Returns
    -------
    torchvision.models.VisionTransformer
        The model in eval mode; it takes images normalised with ``MEAN`` and ``STD``.

    Raises
    ------
    EmbeddedModelError
        The file is missing or its checksum differs.
    """
    import io

    from torchvision.models import VisionTransformer

    data = _verified_bytes(path, sha256)
    model = VisionTransformer(**_METADATA['architecture'])
    model.load_state_dict(torch.load(io.BytesIO(data), map_location='cpu', weights_only=True))
    return model.eval()


def _read_png(path, mode):
    from PIL import Image
    import numpy as np

    try:
        with Image.open(path) as image:
            return torch.from_numpy(np.array(image.convert(mode)))
    except FileNotFoundError:
        raise EmbeddedModelError(f'the embedded sample {path} is missing; reinstall lxt_ext') from None


def load_samples():
    """``(images, masks, labels, names)`` of the shipped held-out samples: images (N, 3, IMAGE_SIZE,
    IMAGE_SIZE) float32 in 0..1 (not normalised), masks (N, IMAGE_SIZE, IMAGE_SIZE) bool (the class
    object's pixels), labels (N,) int64 indices into ``CLASSES``, names the image file names in
    ``SAMPLES_DIR``.

    Returns
    -------
    images : torch.Tensor
        (N, 3, IMAGE_SIZE, IMAGE_SIZE) float32 in 0..1, not normalised.
    masks : torch.Tensor
        (N, IMAGE_SIZE, IMAGE_SIZE) bool, True on the object.
    labels : torch.Tensor
        (N,) int64, indices into ``CLASSES``.
    names : list of str
        The image file names in ``SAMPLES_DIR``.
    """
    samples = _read_json('samples.json')
    images = torch.stack([_read_png(os.path.join(FOLDER, s['image']), 'RGB').permute(2, 0, 1) for s in samples])
    masks = torch.stack([_read_png(os.path.join(FOLDER, s['mask']), 'L') > 127 for s in samples])
    labels = torch.tensor([s['label'] for s in samples], dtype=torch.long)
    names = [os.path.basename(s['image']) for s in samples]
    return images.float() / 255, masks, labels, names
