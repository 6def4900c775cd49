"""lxt_ext.baselines against closed forms (linear and quadratic models), Captum's attributions with the
same settings, and attention rollout against the probabilities each library exposes itself
(recomputed from torchvision's projection weights, timm's unfused path, transformers' eager
``output_attentions``) put through the Abnar & Zuidema product written out here."""
import pytest
import torch

from conftest import require_module
from lxt_ext.attribution.baselines import (METHODS, attention_rollout, gradient, gradient_x_input, integrated_gradients,
                               smoothgrad)


def small_cnn(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(6, 4, 3),
                                torch.nn.Tanh(), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 5)).double().eval()
    return model


def data(seed=1, n=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, dtype=torch.float64, generator=g), torch.tensor([0, 3, 4])[:n]


def test_gradient_and_gradient_x_input_closed_form():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 12, dtype=torch.float64, generator=g)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4, dtype=torch.float64))
    with torch.no_grad():
        model[1].weight.copy_(weight)
    x = torch.randn(3, 3, 2, 2, dtype=torch.float64, generator=g)
    target = torch.tensor([1, 3, 1])
    torch.testing.assert_close(gradient(model, x, target), weight[target].view_as(x))
    torch.testing.assert_close(gradient_x_input(model, x, target), x * weight[target].view_as(x))


def test_against_captum_saliency_and_input_x_gradient():
    attr = require_module('captum.attr')
    model = small_cnn()
    x, target = data()
    torch.testing.assert_close(gradient(model, x, target), attr.Saliency(model).attribute(x, target=target, abs=False))
    torch.testing.assert_close(gradient_x_input(model, x, target), attr.InputXGradient(model).attribute(x, target=target))


@pytest.mark.parametrize('with_baseline', [False, True])
def test_integrated_gradients_against_captum(with_baseline):
    attr = require_module('captum.attr')
    model = small_cnn()
    x, target = data()
    baseline = torch.full((1, 3, 1, 1), 0.3, dtype=torch.float64) if with_baseline else None
    ours = integrated_gradients(model, x, target, n_iter=16, baseline=baseline)
    theirs = attr.IntegratedGradients(model).attribute(
        x, baselines=0. if baseline is None else baseline.expand_as(x), target=target, n_steps=16,
        method='riemann_right')
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


def test_integrated_gradients_closed_form_on_a_linear_model():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)).double()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 2, 2, dtype=torch.float64, generator=g)
    baseline = torch.randn(3, 2, 2, dtype=torch.float64, generator=g)
    target = torch.tensor([2, 0])
    ours = integrated_gradients(model, x, target, n_iter=3, baseline=baseline)
    torch.testing.assert_close(ours, (x - baseline) * model[1].weight[target].view_as(x))  # exact for any n


class Quadratic(torch.nn.Module):
    """f_c(x) = sum_j a_cj x_j^2: gradient 2 a_c x, so SmoothGrad is 2 a_c (mean of the noisy copies)."""

    def __init__(self, features, classes, seed=4):
        super().__init__()
        self.a = torch.randn(classes, features, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))

    def forward(self, x):
        return (x.flatten(1) ** 2) @ self.a.T


def test_smoothgrad_closed_form():
    model = Quadratic(12, 3)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 2, 2, dtype=torch.float64, generator=g)
    target = torch.tensor([1, 2])
    torch.manual_seed(11)
    ours = smoothgrad(model, x, target, n_iter=5, noise_level=0.2)
    torch.manual_seed(11)  # the same draws: n_iter - 1 noisy copies, the last one noise-free
    std = 0.2 * (x.amax((1, 2, 3), keepdim=True) - x.amin((1, 2, 3), keepdim=True))
    copies = [x + torch.randn_like(x) * std for _ in range(4)] + [x]
    expected = sum(2 * model.a[target].view_as(x) * c for c in copies) / 5
    torch.testing.assert_close(ours, expected)
    assert not torch.allclose(ours, gradient(model, x, target))  # the noise did something


def rollout_formula(layers, residual=0.5):
    """Abnar & Zuidema: R = prod_l (residual I + (1 - residual) mean_heads P_l), first layer rightmost."""
    tokens = layers[0].shape[-1]
    result = torch.eye(tokens).expand(layers[0].shape[0], tokens, tokens)
    for probs in layers:
        result = (residual * torch.eye(tokens) + (1 - residual) * probs.float().mean(1)) @ result
    return result


def expected_map(layers, x, grid, prefix=1):
    row = rollout_formula(layers)[:, 0, prefix:].reshape(-1, 1, *grid)
    heat = torch.nn.functional.interpolate(row, size=x.shape[-2:], mode='bilinear', align_corners=False)
    return (heat / x.shape[1]).expand_as(x)


def tiny_torchvision_vit():
    from torchvision.models import VisionTransformer
    torch.manual_seed(0)
    return VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=2, hidden_dim=8, mlp_dim=16,
                             num_classes=3).eval()


def test_rollout_torchvision_vs_recomputed_probabilities():
    model = tiny_torchvision_vit()
    x = torch.randn(2, 3, 16, 16)
    inputs = []
    hooks = [block.ln_1.register_forward_hook(lambda m, a, out: inputs.append(out.detach()))
             for block in model.encoder.layers]
    model(x)
    for h in hooks:
        h.remove()
    layers = []
    for block, h in zip(model.encoder.layers, inputs):
        mha = block.self_attention
        wq, wk, _ = mha.in_proj_weight.chunk(3)
        bq, bk, _ = mha.in_proj_bias.chunk(3)
        heads, d = mha.num_heads, mha.head_dim
        q = (h @ wq.T + bq).view(2, -1, heads, d).transpose(1, 2)
        k = (h @ wk.T + bk).view(2, -1, heads, d).transpose(1, 2)
        layers.append((q @ k.transpose(-2, -1) / d ** 0.5).softmax(-1).detach())
    ours = attention_rollout(model, x, torch.tensor([0, 1]))
    torch.testing.assert_close(ours, expected_map(layers, x, (4, 4)), rtol=1e-5, atol=1e-6)
    assert ours.shape == x.shape and ours.std() > 0
    assert not model.encoder.layers[0].self_attention._forward_hooks  # hooks removed


def test_rollout_timm_vs_its_unfused_probabilities():
    timm = require_module('timm')
    torch.manual_seed(0)
    model = timm.models.vision_transformer.VisionTransformer(img_size=16, patch_size=4, embed_dim=8, depth=2,
                                                             num_heads=2, num_classes=3, reg_tokens=2).eval()
    layers = []
    for block in model.blocks:
        block.attn.fused_attn = False  # the explicit softmax path: its dropout's input is the probabilities
        block.attn.attn_drop.register_forward_hook(lambda m, a, out: layers.append(a[0].detach()))
    x = torch.randn(2, 3, 16, 16)
    model(x)
    ours = attention_rollout(model, x, torch.tensor([2, 0]))
    assert len(layers) == 4  # the reference forward and rollout's forward
    torch.testing.assert_close(ours, expected_map(layers[:2], x, (4, 4), prefix=3), rtol=1e-5, atol=1e-6)


def test_rollout_transformers_vs_output_attentions():
    transformers = require_module('transformers')
    config = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=8, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=16, num_labels=3,
                                    attn_implementation='eager')
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(config).eval()
    x = torch.randn(2, 3, 16, 16)
    layers = [a.detach() for a in model(pixel_values=x, output_attentions=True).attentions]
    ours = attention_rollout(model, x, torch.tensor([0, 2]))
    torch.testing.assert_close(ours, expected_map(layers, x, (4, 4)), rtol=1e-5, atol=1e-6)


def test_methods_take_a_forward_function():
    transformers = require_module('transformers')
    config = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=8, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=16, num_labels=3)
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(config).eval()
    x = torch.randn(2, 3, 8, 8)
    target = torch.tensor([1, 2])
    forward = lambda m, inputs: m(pixel_values=inputs).logits  # noqa: E731
    for name, method in METHODS.items():
        relevance = method(model, x, target, forward=forward)
        assert relevance.shape == x.shape and torch.isfinite(relevance).all() and relevance.abs().sum() > 0, name


def test_bad_input_is_named():
    model = small_cnn()
    x, _ = data()
    with pytest.raises(ValueError, match=r'target must be a LongTensor of shape \(3,\)'):
        gradient(model, x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match='target must be a LongTensor'):
        gradient(model, x, 1)
    with pytest.raises(ValueError, match='found no attention module'):
        attention_rollout(model, x, torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match='must return logits'):
        gradient(lambda inputs: {'scores': inputs}, x, torch.tensor([0, 1, 2]))
