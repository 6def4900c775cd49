"""The images ``lxt-ext evaluate`` compares methods on: the embedded model's shipped samples (with their
object masks and labels), or image files with, optionally, a folder of object masks."""
import os

import torch


def load(inputs, masks=None, model='embedded', size=None, limit=None):
    """The evaluated images, their object masks, labels and names.

    Parameters
    ----------
    inputs : list of str
        Image files, folders, globs or list files (as ``lxt-ext explain`` reads them); empty for the
        embedded model's shipped samples.
    masks : str, optional
        A folder holding one mask PNG per image, named by the image file's stem (white = object).
    model : str, optional
        The model spec; the shipped samples belong to ``'embedded'`` only.
    size : int, optional
        The model's input size: image files and masks are resized to ``size x size``.
    limit : int, optional
        Keep only the first ``limit`` images.

    Returns
    -------
    images : torch.Tensor
        (N, 3, size, size) float32 in 0..1, not normalised.
    masks : torch.Tensor or None
        (N, size, size) bool, True on the object; None for image files without ``masks``.
    labels : torch.Tensor or None
        (N,) class indices of the shipped samples; None for image files.
    names : list of str
        The images' names (paths relative to the inputs' common folder for files).

    Raises
    ------
    ValueError
        Naming what is wrong: samples asked of another model, a mask missing, ``masks`` without inputs, an
        unreadable image.
    FileNotFoundError
        When an input does not exist or names no image.
    """
    if not inputs:
        if model != 'embedded':
            raise ValueError(f'the shipped samples belong to the embedded model; give inputs for --model {model}')
        if masks:
            raise ValueError('--masks goes with inputs; the embedded samples have their own')
        from ..data import embedded
        images, found, labels, names = embedded.load_samples()
    else:
        from ..job.inputs import collect, decode

        root, names = collect(inputs)
        images = torch.stack([decode(os.path.join(root, p), size) for p in names])
        labels = None
        found = _masks(masks, names, size) if masks else None
    if limit:
        images, names = images[:limit], names[:limit]
        found = None if found is None else found[:limit]
        labels = None if labels is None else labels[:limit]
    return images, found, labels, names


def _masks(folder, paths, size):
    """(N, size, size) bool: the mask ``<folder>/<stem>.png`` of each image path, white = object."""
    import numpy as np
    from PIL import Image

    found = []
    for path in paths:
        mask_path = os.path.join(folder, os.path.splitext(os.path.basename(path))[0] + '.png')
        if not os.path.isfile(mask_path):
            raise ValueError(f'no mask {mask_path} for the image {path}')
        with Image.open(mask_path) as mask:
            # nearest neighbour keeps the mask binary at the model's size
            mask = mask.convert('L').resize((size, size), Image.NEAREST)
        found.append(torch.from_numpy(np.array(mask) > 127))
    return torch.stack(found)
