"""The command line: heatmap PNGs from the embedded sample and from folders, for CNNs and ViTs."""
import pytest
import torch
from PIL import Image

from lxt_ext import cli
from lxt_ext.sample import sample_image


def test_cnn_heatmap_of_the_embedded_sample(tmp_path, capsys):
    out = tmp_path / 'heatmap.png'
    assert cli.main(['--model', 'vgg11', '--size', '64', '--out', str(out), '--threads', '2']) == 0
    with Image.open(out) as image:
        assert image.size == (128, 64)  # input and heatmap side by side
        pixels = torch.frombuffer(bytearray(image.convert('RGB').tobytes()), dtype=torch.uint8)
    assert pixels.float().std() > 0
    assert 'sample: class' in capsys.readouterr().out


def test_vit_heatmap_matches_the_attributed_relevance(tmp_path, capsys):
    """The ViT path (LXT's published recipe by default) writes the relevance of the image: the
    printed total equals an attribution made directly with zennit's Gradient and ViTGamma."""
    from zennit.attribution import Gradient
    from lxt_ext.transformer_composites import ViTGamma

    out = tmp_path / 'vit.png'
    assert cli.main(['--model', 'vit_b_32', '--out', str(out), '--target', '3']) == 0
    printed = capsys.readouterr().out
    model, _ = cli.build_model('vit_b_32')
    x = (sample_image(224)[None] - cli.MEAN) / cli.STD
    with Gradient(model, ViTGamma()) as attributor:
        _, relevance = attributor(x, torch.eye(1000)[[3]])
    assert f'total relevance {float(relevance.sum()):.4g}' in printed
    assert relevance.abs().max() > 0
    assert out.exists()


def test_folder_of_images_gives_one_heatmap_each(tmp_path):
    folder = tmp_path / 'images'
    folder.mkdir()
    for index in range(3):
        pixels = (torch.rand(40, 40, 3) * 255).byte().numpy()
        Image.fromarray(pixels).save(folder / f'img{index}.png')
    out = tmp_path / 'heatmaps'
    assert cli.main(['--model', 'resnet18', '--size', '64', '--input', str(folder), '--out', str(out),
                     '--batch-size', '2']) == 0
    assert sorted(p.name for p in out.iterdir()) == [f'img{i}_heatmap.png' for i in range(3)]


@pytest.mark.parametrize('argv,message', [
    (['--model', 'vit_b_16', '--composite', 'epsilon_gamma_box'], 'does not fit vit_b_16'),
    (['--model', 'vgg11', '--composite', 'vit_gamma'], 'does not fit vgg11'),
    (['--model', 'vit_b_16', '--size', '64'], '224'),
    (['--input', '/no/such/folder'], 'no such image'),
])
def test_bad_arguments_are_clear_errors(argv, message, capsys, tmp_path):
    with pytest.raises((SystemExit, FileNotFoundError)) as error:
        cli.main(argv + ['--out', str(tmp_path / 'x.png')])
    assert message in capsys.readouterr().err + str(error.value)
