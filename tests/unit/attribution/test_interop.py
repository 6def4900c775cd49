"""lxt_ext.interop called by Captum (infidelity, sensitivity_max) and Quantus themselves; relevance
against zennit's own attributor and composites, and the metrics against their closed forms on linear
models."""
import numpy as np
import pytest
import torch
import zennit.attribution
import zennit.composites

import lxt_ext.composites
from conftest import randomize_biases, require_module
from lxt_ext.attribution.interop import LRP, quantus_explain

captum_metrics = require_module('captum.metrics')


def cnn(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(6, 4, 3, stride=2),
                                torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 3 * 3, 5)).eval()
    return randomize_biases(model, torch.Generator().manual_seed(seed))


def zennit_relevance(model, composite, x, target):
    with zennit.attribution.Gradient(model, composite) as attributor:
        # lxt_ext's entry points seed the explained logit as the output's relevance
        _, relevance = attributor(x, lambda y: y * torch.nn.functional.one_hot(target, 5).float())
    return relevance


def inputs(seed=1, n=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.tensor([0, 4, 2])[:n]


@pytest.mark.parametrize('as_list', [False, True])
def test_attribute_matches_zennit(as_list):
    model = cnn()
    x, target = inputs()
    ours = LRP(model, lxt_ext.composites.EpsilonPlus()).attribute(x, target=target.tolist() if as_list else target)
    theirs = zennit_relevance(model, zennit.composites.EpsilonPlus(), x, target)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)
    # one int target for all rows, as Captum allows
    one = LRP(model, lxt_ext.composites.EpsilonPlus()).attribute(x, target=3)
    torch.testing.assert_close(one, zennit_relevance(model, zennit.composites.EpsilonPlus(), x, torch.full((3,), 3)),
                               rtol=1e-4, atol=1e-6)


def test_attribute_vit_matches_zennit_attributor():
    from torchvision.models import VisionTransformer
    torch.manual_seed(0)
    vit = VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16,
                            num_classes=5).eval()
    torch.nn.init.normal_(vit.heads.head.weight)  # torchvision zero-initialises the head
    x = torch.randn(2, 3, 16, 16)
    target = torch.tensor([1, 3])
    ours = LRP(vit, lxt_ext.composites.ViTEpsilon()).attribute(x, target=target)
    theirs = zennit_relevance(vit, lxt_ext.composites.ViTEpsilon(), x, target)
    assert ours.abs().sum() > 0
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)


class Scaled(torch.nn.Module):
    """f(x, scale) = scale * (W x), no bias: gradient scale * W."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3 * 8 * 8, 5, bias=False)

    def forward(self, x, scale):
        return scale * self.linear(x.flatten(1))


def test_infidelity_through_captum():
    model = Scaled().eval()
    x, target = inputs()

    def perturb(inputs):  # deterministic: every sample the same perturbation I = 0.1 sign(x)
        noise = 0.1 * torch.sign(inputs)
        return noise, inputs - noise

    # plain gradient of a linear model: attribution . I equals f(x) - f(x - I) exactly
    gradient = LRP(model).attribute(x, target=target, additional_forward_args=(2.0,))
    torch.testing.assert_close(gradient, 2.0 * model.linear.weight[target].view_as(x))
    zero = captum_metrics.infidelity(model, perturb, x, gradient, additional_forward_args=(2.0,), target=target,
                                     n_perturb_samples=2)
    assert zero.shape == (3,) and zero.abs().max() < 1e-8

    # LRP on a CNN: Captum's infidelity equals (R . I - (f(x) - f(x - I)))^2 written out
    model = cnn()
    relevance = LRP(model, lxt_ext.composites.EpsilonPlus()).attribute(x, target=target)
    ours = captum_metrics.infidelity(model, perturb, x, relevance, target=target, n_perturb_samples=2)
    noise = 0.1 * torch.sign(x)
    with torch.no_grad():
        drop = (model(x) - model(x - noise)).gather(1, target[:, None])[:, 0]
    expected = ((relevance * noise).flatten(1).sum(1) - drop) ** 2
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-6)
    assert expected.min() > 0


def test_sensitivity_max_through_captum():
    model = Scaled().eval()
    x, target = inputs()
    lrp = LRP(model, lxt_ext.composites.EpsilonPlus(), forward=lambda m, inputs, *args: m(inputs, 1.0))

    def perturb(inputs, perturb_radius):
        return inputs + perturb_radius * torch.sign(inputs)

    ours = captum_metrics.sensitivity_max(lrp.attribute, x, perturb_func=perturb, perturb_radius=0.05,
                                          n_perturb_samples=2, target=target)
    # epsilon-LRP of a bias-free linear layer seeded with its logit z = w . x: R(x) = x * w * z / stab(z) = x * w
    # (epsilon 1e-6)
    w = model.linear.weight[target].view_as(x).detach()
    lrp_closed_form = lambda v: v * w  # noqa: E731
    change = lrp_closed_form(perturb(x, 0.05)) - lrp_closed_form(x)
    expected = change.flatten(1).norm(dim=1) / lrp_closed_form(x).flatten(1).norm(dim=1)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-6)


def test_captum_style_errors():
    lrp = LRP(cnn(), lxt_ext.composites.EpsilonPlus())
    x, _ = inputs()
    with pytest.raises(ValueError, match='tuple targets'):
        lrp.attribute(x, target=[(0, 1)] * 3)
    with pytest.raises(ValueError, match='one input tensor'):
        lrp.attribute((x, x), target=1)
    assert isinstance(lrp.attribute((x,), target=1), tuple)


def test_quantus_calls_explain_func():
    quantus = require_module('quantus')
    model = cnn(seed=2)
    x, target = inputs(seed=3)
    calls = []

    def spy(**kwargs):
        calls.append(sorted(kwargs))
        return quantus_explain(**kwargs)

    common = dict(patch_size=4, order='morf', regions_evaluation=4, abs=False, normalise=False, perturb_baseline=0.0,
                  disable_warnings=True)
    ours = quantus.RegionPerturbation(**common)(
        model=model, x_batch=x.numpy(), y_batch=target.numpy(), a_batch=None, explain_func=spy,
        explain_func_kwargs={'composite': lxt_ext.composites.EpsilonPlus()}, softmax=False, channel_first=True,
        device='cpu')
    assert calls and 'composite' in calls[0]
    reference = zennit_relevance(model, zennit.composites.EpsilonPlus(), x, target)
    theirs = quantus.RegionPerturbation(**common)(
        model=model, x_batch=x.numpy(), y_batch=target.numpy(), a_batch=reference.numpy(), softmax=False,
        channel_first=True, device='cpu')
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match='unknown keyword arguments'):
        quantus_explain(model=model, inputs=x.numpy(), targets=target.numpy(), method='Saliency')
