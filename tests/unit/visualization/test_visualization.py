"""lxt_ext.visualization: heatmap images of relevance, coloured with zennit's colour maps.

The oracle for colours is zennit's colour map itself (``zennit.image.CMAPS``) at the symmetric
normalisation (R / max|R| + 1) / 2, and the colour map's definition ('coldnhot': cyan, blue, black
at 0.5, red, yellow, white) for the sign of each pixel.
"""
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from zennit.image import CMAPS

from lxt_ext.visualization import imgify, save_heatmap
from conftest import ROOT

README = Path(ROOT) / 'README.md'


def readme_vit_snippet():
    """The Python block after ``<!-- vit-snippet -->`` in README.md, as written there."""
    match = re.search(r'<!-- vit-snippet -->\n```python\n(.*?)```', README.read_text(), re.S)
    assert match, 'README.md has no ```python block after <!-- vit-snippet -->'
    return match.group(1)


def tiny_vit():
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                               hidden_dim=32, mlp_dim=64).eval()
    # torchvision zero-initialises the head: zero logits, zero relevance
    torch.nn.init.normal_(vit.heads.head.weight, std=0.1)
    return vit


def oracle_pixels(relevance, cmap='coldnhot'):
    """zennit's colour map at the channel-summed relevance scaled symmetrically into 0..1, in 0..255."""
    summed = np.asarray(relevance, dtype=np.float64).reshape(-1, *relevance.shape[-2:]).sum(0)
    return CMAPS[cmap]((summed / np.abs(summed).max() + 1) / 2) * 255


def png_pixels(path):
    with Image.open(path) as image:
        assert image.mode == 'RGB'
        return np.asarray(image).astype(np.float64)


def test_readme_vit_snippet_writes_the_relevance_heatmap(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {'vit': tiny_vit(), 'x': torch.randn(1, 3, 32, 32), 'target_onehot': torch.eye(1000)[[3]]}
    exec(compile(readme_vit_snippet(), str(README), 'exec'), namespace)

    relevance = namespace['relevance'][0].detach()
    summed = relevance.sum(0)
    assert summed.min() < 0 < summed.max()
    pixels = png_pixels(tmp_path / 'heatmap_vit.png')
    assert pixels.shape == (32, 32, 3)
    assert np.abs(pixels - oracle_pixels(relevance.numpy())).max() <= 1
    # 'coldnhot' by its definition: the largest |R| is white if positive, cyan if negative; clearly
    # positive pixels are hot (R >= G >= B), clearly negative ones cold (no red, G <= B). (Its black
    # node sits at 128/255, not at 0.5: |R| / max|R| under 1/255 may come out a faint blue.)
    scaled = (summed / summed.abs().max()).numpy()
    extreme = np.unravel_index(np.abs(scaled).argmax(), scaled.shape)
    assert (pixels[extreme] == ((255, 255, 255) if scaled[extreme] > 0 else (0, 255, 255))).all()
    hot, cold = pixels[scaled > 2 / 255], pixels[scaled < -2 / 255]
    assert len(hot) and len(cold)
    assert (hot[:, 0] >= hot[:, 1]).all() and (hot[:, 1] >= hot[:, 2]).all()
    assert (cold[:, 0] == 0).all() and (cold[:, 1] <= cold[:, 2]).all()

@pytest.mark.parametrize('cmap', sorted(CMAPS))
@pytest.mark.parametrize('shape', [(5, 7), (1, 5, 7), (3, 5, 7)])
def test_imgify_is_zennits_colour_map_of_the_symmetric_channel_sum(shape, cmap):
    torch.manual_seed(0)
    relevance = torch.randn(shape, dtype=torch.float64)
    image = imgify(relevance, cmap=cmap)
    assert image.size == (7, 5) and image.mode == 'RGB'
    pixels = np.asarray(image).astype(np.float64)
    assert np.abs(pixels - oracle_pixels(relevance.numpy(), cmap)).max() <= 0.5 + 1e-9  # rounded
    assert (np.asarray(imgify(relevance.numpy(), cmap=cmap)) == np.asarray(image)).all()  # arrays alike


def test_zero_relevance_is_the_colour_maps_centre():
    pixels = np.asarray(imgify(torch.zeros(4, 4)))
    assert (pixels == np.round(CMAPS['coldnhot'](np.array(0.5)) * 255)).all()
    assert pixels.max() <= 2  # coldnhot's centre: black, up to the 1/255 offset of its black node


def test_compress_level_changes_the_encoding_not_the_pixels(tmp_path):
    relevance = torch.randn(3, 40, 30, generator=torch.Generator().manual_seed(3))
    save_heatmap(relevance, tmp_path / 'default.png')
    save_heatmap(relevance, tmp_path / 'fast.png', compress_level=1)
    default, fast = (np.asarray(Image.open(tmp_path / name)) for name in ('default.png', 'fast.png'))
    assert np.array_equal(default, fast) and np.array_equal(fast, np.asarray(imgify(relevance)))
    assert (tmp_path / 'fast.png').read_bytes() != (tmp_path / 'default.png').read_bytes()


def test_save_heatmap_puts_the_input_beside_the_heatmap(tmp_path):
    torch.manual_seed(0)
    image, relevance = torch.rand(3, 6, 5), torch.randn(6, 5)
    save_heatmap(relevance, tmp_path / 'side.png', image=image)
    pixels = png_pixels(tmp_path / 'side.png')
    assert pixels.shape == (6, 10, 3)
    assert np.abs(pixels[:, :5] - image.permute(1, 2, 0).numpy() * 255).max() <= 0.5 + 1e-6
    assert (pixels[:, 5:] == np.asarray(imgify(relevance))).all()


@pytest.mark.parametrize('call,message', [
    (lambda: imgify(torch.zeros(2, 4, 4)), 'relevance must be (H, W) or (1|3, H, W)'),
    (lambda: imgify(torch.zeros(4, 4), cmap='viridis'), "unknown colour map 'viridis'"),
    (lambda: save_heatmap(torch.zeros(4, 4), 'x.png', image=torch.zeros(3, 4, 5)), 'image must be (3, H, W)'),
])
def test_bad_inputs_are_clear_errors(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()
