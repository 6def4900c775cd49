"""``lxt-ext evaluate`` and the library behind it (lxt_ext.evaluation.compare, gamma_search): the written
numbers against perturbation curves computed here by hand (patches zeroed explicitly, Captum's
InputXGradient as the relevance), the gamma grid's heatmaps against zennit's own attributor with the same
composites, and bad arguments as exit status 2 with a message."""
import json
import math
import os

import pytest
import torch
import zennit.attribution

from conftest import ROOT, require, require_module
from lxt_ext.cli import main
from lxt_ext.composites import ViTGamma
from lxt_ext.evaluation.compare import compare, lrp_method, markdown_table
from lxt_ext.evaluation.gamma_search import gamma_search, save_grid

EMBEDDED = os.path.join(ROOT, 'lxt_ext', 'data', 'embedded', 'model.json')


def tiny_vit(seed=0):
    from torchvision.models import VisionTransformer
    torch.manual_seed(seed)
    model = VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
                              num_classes=4).eval()
    torch.nn.init.normal_(model.heads.head.weight, std=0.5)  # torchvision zero-initialises the head
    return model


def patch_curve_by_hand(model, x, relevance, target, patch, steps):
    """MoRF deletion written out: zero the `k` patches of largest relevance sum (ties: earlier first),
    for each k in ``steps``."""
    n, _, h, w = x.shape
    curves = []
    for i in range(n):
        sums = [(float(relevance[i, :, r:r + patch, c:c + patch].sum()), -(r // patch * (w // patch) + c // patch), r, c)
                for r in range(0, h, patch) for c in range(0, w, patch)]
        ranked = sorted(sums, reverse=True)
        curve = []
        for k in steps:
            xi = x[i:i + 1].clone()
            for _, _, r, c in ranked[:k]:
                xi[..., r:r + patch, c:c + patch] = 0
            with torch.no_grad():
                curve.append(float(model(xi)[0, target[i]]))
        curves.append(curve)
    return torch.tensor(curves, dtype=torch.float64)


def test_compare_against_hand_written_curves():
    captum_attr = require_module('captum.attr')
    model = tiny_vit()
    g = torch.Generator().manual_seed(1)
    images = torch.rand(3, 3, 16, 16, generator=g)  # batch_size 2: two batches, the second of one image
    masks = torch.zeros(3, 16, 16, dtype=torch.bool)
    masks[:, 4:12, 4:12] = True
    from lxt_ext.attribution.baselines import gradient_x_input
    results = compare(model, images, {'gradient_x_input': gradient_x_input}, masks=masks, batch_size=2,
                      patch_size=4, units_per_step=2, progress=False)
    (result,) = results
    with torch.no_grad():
        target = model(images).argmax(1)
    relevance = captum_attr.InputXGradient(model).attribute(images.clone().requires_grad_(), target=target).detach()
    expected = patch_curve_by_hand(model, images, relevance, target, 4, range(0, 17, 2))
    torch.testing.assert_close(result.morf, expected, rtol=1e-4, atol=1e-5)
    # areas: trapezoid over 8 steps divided by 8
    trapezoid = (expected.sum(1) - (expected[:, 0] + expected[:, -1]) / 2) / 8
    torch.testing.assert_close(result.morf_area, trapezoid, rtol=1e-4, atol=1e-5)
    pixel = relevance.sum(1).flatten(1)
    positive = pixel.clamp(min=0)
    torch.testing.assert_close(result.relevance_mass, (positive * masks.flatten(1)).sum(1) / positive.sum(1),
                               rtol=1e-4, atol=1e-6)
    assert result.seconds > 0 and result.example.shape == (16, 16)
    table = markdown_table(results)
    assert table.splitlines()[2].startswith('| gradient_x_input | ') and 'n/a' not in table


def test_gamma_search_heatmaps_and_best():
    model = tiny_vit(seed=2)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    search = gamma_search(model, images, conv_gammas=(0.1, 100.), linear_gammas=(0., 0.05, 1.), patch_size=4,
                          max_steps=6, units_per_step=2, progress=False)
    assert search.abpc.shape == (2, 3) and torch.isfinite(search.abpc).all()
    flat = search.abpc.flatten()
    assert search.best == ((0.1, 100.)[int(flat.argmax()) // 3], (0., 0.05, 1.)[int(flat.argmax()) % 3])
    with torch.no_grad():
        target = model(images).argmax(1)
    for i, conv in enumerate((0.1, 100.)):
        for j, linear in enumerate((0., 0.05, 1.)):
            with zennit.attribution.Gradient(model, ViTGamma(conv_gamma=conv, linear_gamma=linear, attention='cp')) as a:
                # the search explains through lxt_ext's entry point, which seeds the explained logit
                _, relevance = a(images[:1], lambda y: y * torch.nn.functional.one_hot(target[:1], 4).float())
            torch.testing.assert_close(search.heatmaps[i, j], relevance[0].sum(0), rtol=1e-4, atol=1e-6)
    assert not torch.equal(search.heatmaps[0, 0], search.heatmaps[1, 2])  # the gammas change the map


def test_plots_are_written(tmp_path):
    model = tiny_vit()
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    search = gamma_search(model, images, conv_gammas=(0.25,), linear_gammas=(0., 1.), patch_size=4, max_steps=2,
                          units_per_step=8, progress=False)
    save_grid(search, tmp_path / 'grid.png', image=images[0])
    from PIL import Image
    with Image.open(tmp_path / 'grid.png') as picture:
        assert picture.size[0] > picture.size[1] > 100


@pytest.fixture(scope='module')
def hf_files(tmp_path_factory):
    """A tiny Hugging Face ViT folder, three 16 x 16 PNG images and their masks."""
    transformers = require_module('transformers')
    import numpy as np
    from PIL import Image
    root = tmp_path_factory.mktemp('hf')
    config = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=32, num_labels=4)
    torch.manual_seed(0)
    transformers.ViTForImageClassification(config).save_pretrained(root / 'model')
    (root / 'images').mkdir()
    (root / 'masks').mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)).save(root / 'images' / f'im{i}.png')
        mask = np.zeros((16, 16), np.uint8)
        mask[2 + i:10 + i, 4:12] = 255
        Image.fromarray(mask).save(root / 'masks' / f'im{i}.png')
    return root


def test_cli_on_image_files_with_masks(hf_files, tmp_path, capsys):
    captum_attr = require_module('captum.attr')
    import numpy as np
    from PIL import Image
    from transformers import ViTForImageClassification
    out = tmp_path / 'ev'
    status = main(['evaluate', str(hf_files / 'images'), '--masks', str(hf_files / 'masks'), '--model',
                   str(hf_files / 'model'), '--methods', 'vit_gamma:cp,gradient_x_input,attention_rollout',
                   '--units-per-step', '2', '--out', str(out), '--quiet'])
    assert status == 0
    printed = capsys.readouterr().out
    for name in ('vit_gamma:cp', 'gradient_x_input', 'attention_rollout'):
        assert f'| {name} |' in printed
    record = json.loads((out / 'evaluation.json').read_text())
    assert record['settings']['images'] == 3 and record['settings']['command'].startswith('lxt-ext evaluate ')
    # gradient x input's relevance mass, recomputed with Captum on the files (normalised with HF's 0.5 / 0.5)
    model = ViTForImageClassification.from_pretrained(hf_files / 'model', use_kernels=False).eval()
    images = torch.stack([torch.from_numpy(np.array(Image.open(hf_files / 'images' / f'im{i}.png'))).permute(2, 0, 1)
                          for i in range(3)]).float() / 255
    masks = torch.stack([torch.from_numpy(np.array(Image.open(hf_files / 'masks' / f'im{i}.png')) > 127)
                         for i in range(3)])
    x = (images - 0.5) / 0.5
    logits = lambda inputs: model(pixel_values=inputs).logits  # noqa: E731
    with torch.no_grad():
        target = logits(x).argmax(1)
    relevance = captum_attr.InputXGradient(logits).attribute(x.clone().requires_grad_(), target=target).sum(1).detach()
    positive = relevance.clamp(min=0).flatten(1)
    expected = ((positive * masks.flatten(1)).sum(1) / positive.sum(1)).tolist()
    assert record['methods']['gradient_x_input']['per_image']['relevance_mass'] == pytest.approx(expected, rel=1e-4)
    for name, values in record['methods'].items():
        assert math.isfinite(values['abpc']) and len(values['mean_curve']['morf']) == 9, name  # 16 patches / 2 + 1
    assert (out / 'evaluation.md').read_text().count('\n| ') == 4  # header rule + 3 methods
    with Image.open(out / 'evaluation.png') as picture:
        assert picture.size[0] >= 800


@pytest.mark.parametrize('argv,message', [
    (['--methods', 'gradient,lime'], "unknown method 'lime'"),
    (['--methods', 'epsilon_plus'], 'does not fit'),
    (['--target', 'some'], '--target must be predicted, label or a class index'),
    (['--target', 'label'], '--target label needs labelled data'),
    (['--conv-gammas', 'a,b', '--gamma-search'], 'expected comma-separated numbers'),
])
def test_cli_bad_arguments(hf_files, tmp_path, capsys, argv, message):
    assert main(['evaluate', str(hf_files / 'images'), '--model', str(hf_files / 'model'), '--out', str(tmp_path),
                 '--quiet'] + argv) == 2
    assert message in capsys.readouterr().err


def embedded_or_skip():
    require(os.path.isfile(EMBEDDED), 'the embedded model (lxt_ext/data/embedded) is not there')


def test_cli_on_the_embedded_samples(tmp_path, capsys):
    embedded_or_skip()
    out = tmp_path / 'ev'
    status = main(['evaluate', '--methods', 'vit_gamma:cp,gradient_x_input,attention_rollout', '--limit', '2',
                   '--units-per-step', '16', '--out', str(out), '--quiet', '--threads', '2'])
    assert status == 0
    printed = capsys.readouterr().out
    for name in ('vit_gamma:cp', 'gradient_x_input', 'attention_rollout'):
        assert f'| {name} |' in printed
    record = json.loads((out / 'evaluation.json').read_text())
    assert record['settings']['images'] == 2 and record['settings']['unit'] == 'patch'
    for name, values in record['methods'].items():
        assert math.isfinite(values['abpc']) and 0 <= values['relevance_mass'] <= 1, name
        assert values['abpc'] == pytest.approx(sum(values['per_image']['abpc']) / 2)
    assert (out / 'evaluation.md').read_text().count('\n| ') == 4  # header rule + 3 methods
    from PIL import Image
    with Image.open(out / 'evaluation.png') as picture:
        assert picture.size[0] >= 800


def test_cli_gamma_search(tmp_path):
    embedded_or_skip()
    out = tmp_path / 'gs'
    status = main(['evaluate', '--gamma-search', '--conv-gammas', '0.25', '--linear-gammas', '0,1', '--limit', '1',
                   '--units-per-step', '32', '--out', str(out), '--quiet'])
    assert status == 0
    record = json.loads((out / 'gamma_search.json').read_text())
    best = record['settings']['best']
    scores = {name: v['abpc'] for name, v in record['methods'].items()}
    assert f"conv {best['conv_gamma']:g}, linear {best['linear_gamma']:g}" == max(scores, key=scores.get)
    assert (out / 'gamma_search.png').is_file()


def test_cli_warns_of_random_weights(hf_files, tmp_path):
    """A torchvision model named without --weights has random weights: evaluate says so, as explain and check do."""
    with pytest.warns(UserWarning, match='resnet18 has random weights'):
        status = main(['evaluate', str(hf_files / 'images'), '--model', 'resnet18', '--methods', 'gradient',
                       '--units-per-step', '98', '--limit', '1', '--out', str(tmp_path / 'ev'), '--quiet'])
    assert status == 0
