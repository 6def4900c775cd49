"""Images from disk: files and folders of files, resized and scaled to 0..1."""
import os

import torch

IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.webp', '.tif', '.tiff')


def load_images(paths, size):
    """``(names, N x 3 x size x size tensor in 0..1)`` from image files and folders of images."""
    from PIL import Image

    files = []
    for path in paths:
        if os.path.isdir(path):
            files += sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(IMAGE_SUFFIXES))
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise FileNotFoundError(f'no such image file or folder: {path}')
    if not files:
        raise FileNotFoundError(f'no images ({", ".join(IMAGE_SUFFIXES)}) found in {paths}')
    images = []
    for file in files:
        with Image.open(file) as img:
            img = img.convert('RGB').resize((size, size), Image.BILINEAR)
            data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
            images.append(data.view(size, size, 3).permute(2, 0, 1).float() / 255)
    return files, torch.stack(images)
