"""Images for the command line: files from disk, or an embedded synthetic default (no downloads)."""
import os

import torch

IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.webp', '.tif', '.tiff')


def sample_image(size=224):
    """A deterministic 3 x size x size picture in 0..1: sky, sun, a house and grass."""
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing='ij')
    image = torch.stack([0.45 + 0.3 * ys, 0.65 + 0.2 * ys, torch.full_like(ys, 0.95)])
    grass = ys > 0.72
    image[:, grass] = torch.tensor([0.2, 0.6, 0.15])[:, None] * (0.8 + 0.2 * torch.sin(40 * xs[grass]))
    sun = (xs - 0.8) ** 2 + (ys - 0.2) ** 2 < 0.01
    image[:, sun] = torch.tensor([1.0, 0.85, 0.2])[:, None]
    wall = (xs > 0.22) & (xs < 0.55) & (ys > 0.45) & (ys <= 0.75)
    image[:, wall] = torch.tensor([0.75, 0.3, 0.2])[:, None]
    roof = (ys > 0.25) & (ys <= 0.45) & ((xs - 0.385).abs() < (ys - 0.25) * 1.0)
    image[:, roof] = torch.tensor([0.35, 0.2, 0.15])[:, None]
    door = (xs > 0.34) & (xs < 0.42) & (ys > 0.6) & (ys <= 0.75)
    image[:, door] = torch.tensor([0.25, 0.15, 0.1])[:, None]
    return image.clamp(0, 1)


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
