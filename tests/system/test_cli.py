"""The command line's structure (subcommands, help, console entry) and the CNN path of ``lxt-ext explain``
against zennit's own composite."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from lxt_ext import cli


def test_a_command_is_required(capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main([])
    assert exit.value.code == 2
    assert 'explain' in capsys.readouterr().err


def test_python_dash_m_lists_the_commands():
    process = subprocess.run([sys.executable, '-m', 'lxt_ext', '--help'], capture_output=True, text=True)
    assert process.returncode == 0
    assert 'explain' in process.stdout


def test_cnn_with_local_weights_matches_zennits_composite(tmp_path):
    """A resnet18 state_dict file (BatchNorm statistics and biases drawn, so the rules differ from the
    plain gradient) explained by `explain` with epsilon_gamma_box equals zennit's own EpsilonGammaBox
    with zennit's ResNetCanonizer on the same image."""
    import torchvision
    from zennit.attribution import Gradient
    from zennit.composites import EpsilonGammaBox
    from zennit.torchvision import ResNetCanonizer

    torch.manual_seed(1)
    model = torchvision.models.resnet18(num_classes=1000).eval()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.1, 0.1)
    weights = tmp_path / 'resnet18.pt'
    torch.save(model.state_dict(), weights)
    folder = tmp_path / 'images'
    folder.mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / 'x.png')
    out = tmp_path / 'out'
    assert cli.main(['explain', str(folder), '--model', 'resnet18', '--weights', str(weights), '--out', str(out),
                     '--relevance', 'npy', '--quiet', '--workers', '0']) == 0
    row = json.loads((out / 'index.jsonl').read_text())
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = (torch.from_numpy(pixels).permute(2, 0, 1).float()[None] / 255 - mean) / std
    composite = EpsilonGammaBox(low=(0 - mean) / std, high=(1 - mean) / std, canonizers=[ResNetCanonizer()])
    with Gradient(model, composite) as attributor:
        # lxt_ext's entry points seed the explained logit as the output's relevance
        logits, expected = attributor(x, lambda y: y * torch.nn.functional.one_hot(y.argmax(1), 1000).to(y))
    assert row['explained'] == int(logits.argmax())
    assert row['relevance_sum'] == pytest.approx(float(expected.sum()), rel=1e-4)
    relevance = np.load(out / row['relevance'])
    scale = float(expected.abs().max())
    np.testing.assert_allclose(relevance, expected[0].numpy(), atol=1e-4 * scale)
    with Image.open(out / row['heatmap']) as heatmap:
        assert heatmap.size == (224, 224)
