"""The embedded default image: a synthetic picture drawn from formulas, so nothing is downloaded."""
import torch


def sample_image(size=224):
    """A deterministic 3 x size x size picture in 0..1: sky, sun, a house and grass.

    Parameters
    ----------
    size : int, optional
        Height and width in pixels (default 224).

    Returns
    -------
    torch.Tensor
        (3, size, size) float32 in 0..1.
    """
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
