"""The images of a job: collected from files, folders, globs and list files, in one global order, and
decoded in DataLoader workers.

Every image is named by its path relative to the ``root`` (the deepest folder holding all inputs), so
equal file names in different folders get different outputs, and its place in the sorted global list
fixes the batch it belongs to, whatever the number of processes.
"""
import glob
import os

import torch

IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.webp', '.tif', '.tiff', '.gif', '.ppm', '.pgm')
LIST_SUFFIXES = ('.txt', '.lst')
RESIZE_MODES = ('stretch', 'none')


def _is_image(path):
    return path.lower().endswith(IMAGE_SUFFIXES)


def _expand(spec):
    """The image files one input ``spec`` names (a file, a folder searched recursively, a glob, or a
    list file of paths, one per line, relative to the list's folder)."""
    if os.path.isdir(spec):
        found = []
        for folder, subfolders, files in os.walk(spec, followlinks=True):
            subfolders.sort()
            found += [os.path.join(folder, f) for f in files if _is_image(f)]
        return found
    if os.path.isfile(spec):
        if spec.lower().endswith(LIST_SUFFIXES):
            folder = os.path.dirname(os.path.abspath(spec))
            with open(spec, encoding='utf-8') as handle:
                lines = [line.strip() for line in handle]
            return [p for line in lines if line and not line.startswith('#')
                    for p in _expand(os.path.join(folder, os.path.expanduser(line)))]
        return [spec]  # named explicitly: taken whatever its suffix (a failure is reported if it is no image)
    if glob.has_magic(spec):
        return [p for p in sorted(glob.glob(spec, recursive=True)) if os.path.isfile(p) and _is_image(p)]
    raise FileNotFoundError(f'no such image file, folder or list: {spec}')


def collect(specs):
    """``(root, sorted relative paths)`` of every image the input ``specs`` name (duplicates once).

    Raises FileNotFoundError naming a spec that does not exist, and when no image is found at all."""
    if not specs:
        raise ValueError('no inputs given')
    files = sorted({os.path.realpath(p) for spec in specs for p in _expand(spec)})
    if not files:
        raise FileNotFoundError(f'no images ({", ".join(IMAGE_SUFFIXES)}) found in {", ".join(specs)}')
    root = os.path.commonpath([os.path.dirname(f) for f in files])
    return root, [os.path.relpath(f, root) for f in files]


def decode(path, size, resize='stretch'):
    """``3 x size x size`` float tensor in 0..1 of the image file ``path``; raises ValueError naming the
    cause for zero-byte, unreadable or (with ``resize='none'``) wrongly sized images."""
    from PIL import Image, UnidentifiedImageError

    if os.path.getsize(path) == 0:
        raise ValueError('zero-byte file')
    try:
        with Image.open(path) as img:
            img.load()
            if resize == 'none' and img.size != (size, size):
                raise ValueError(f'image is {img.size[0]} x {img.size[1]}, the model takes {size} x {size} '
                                 f'(use --resize stretch)')
            img = img.convert('RGB')
            if img.size != (size, size):
                img = img.resize((size, size), Image.BILINEAR)
            data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    except UnidentifiedImageError:
        raise ValueError('not an image file Pillow can read') from None
    except (OSError, SyntaxError) as error:  # truncated or corrupt data
        raise ValueError(f'corrupt image: {error}') from None
    return data.view(size, size, 3).permute(2, 0, 1).float().div_(255)


class ImageFiles(torch.utils.data.Dataset):
    """Item ``i``: ``(i, image or None, error or None)``; a failure never stops the loader."""

    def __init__(self, root, names, size, resize='stretch'):
        if resize not in RESIZE_MODES:
            raise ValueError(f'resize must be one of {RESIZE_MODES}, got {resize!r}')
        self.root, self.names, self.size, self.resize = root, names, size, resize

    def __len__(self):
        return len(self.names)

    def __getitem__(self, index):
        try:
            return index, decode(os.path.join(self.root, self.names[index]), self.size, self.resize), None
        except (ValueError, OSError) as error:
            return index, None, str(error)


def collate(items):
    """``(indices, stacked images or None, indices that loaded, {index: error})``."""
    loaded = [(i, image) for i, image, error in items if error is None]
    errors = {i: error for i, _, error in items if error is not None}
    images = torch.stack([image for _, image in loaded]) if loaded else None
    return [i for i, *_ in items], images, [i for i, _ in loaded], errors
