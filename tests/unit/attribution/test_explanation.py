"""``lxt_ext.explanation``: one forward per batch, against zennit's Gradient attributor (image composites),
lxt_ext's Explainer (text composites) and the plain autograd gradient."""
import pytest
import torch
import torchvision
from zennit.attribution import Gradient

from lxt_ext.composites import EpsilonPlus, LanguageTransformer, ViTEpsilon, ViTGamma
from lxt_ext.attribution import Explainer, explain, explain_batch


def small_vit(seed=0):
    torch.manual_seed(seed)
    model = torchvision.models.VisionTransformer(32, 8, 2, 4, 32, 64, num_classes=7).eval()
    torch.nn.init.normal_(model.heads.head.weight, std=0.1)
    return model


@pytest.mark.parametrize('composite', [ViTEpsilon, ViTGamma], ids=['epsilon', 'gamma'])
def test_vit_relevance_equals_zennits_gradient_attributor(composite):
    model, x = small_vit(), torch.randn(3, 3, 32, 32)
    e = explain_batch(model, x, composite())
    logits = model(x)
    with Gradient(model, composite()) as attributor:
        _, expected = attributor(x, lambda y: y * torch.eye(7)[logits.argmax(1)])  # the explained logit
    torch.testing.assert_close(e.relevance, expected)
    torch.testing.assert_close(e.target, logits.argmax(1))
    torch.testing.assert_close(e.score, logits.max(1).values)
    torch.testing.assert_close(e.output, logits)


def test_top_k_equals_one_explanation_per_class():
    model, x = small_vit(), torch.randn(2, 3, 32, 32)
    e = explain_batch(model, x, ViTEpsilon(), top_k=3)
    top = model(x).topk(3, dim=1)
    assert e.relevance.shape == (2, 3, 3, 32, 32)
    torch.testing.assert_close(e.target, top.indices)
    torch.testing.assert_close(e.score, top.values)
    for j in range(3):
        single = explain_batch(model, x, ViTEpsilon(), target=top.indices[:, j])
        torch.testing.assert_close(e.relevance[:, j], single.relevance, rtol=1e-5, atol=1e-7)


def test_no_composite_is_the_plain_gradient():
    model, x = small_vit(), torch.randn(2, 3, 32, 32)
    e = explain_batch(model, x, None, target=4)
    xg = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(model(xg)[:, 4].sum(), xg)
    torch.testing.assert_close(e.relevance, grad)


def test_cnn_composite_gives_zennit_relevance():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    e = explain_batch(model, x, EpsilonPlus(), target=torch.tensor([1, 2]))
    import zennit.composites
    with Gradient(model, zennit.composites.EpsilonPlus()) as attributor:
        _, expected = attributor(x, lambda y: y * torch.eye(10)[[1, 2]])  # the explained logit
    torch.testing.assert_close(e.relevance, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_text_composite_gives_x_times_gradient():
    """LanguageTransformer emits no relevance at the input: relevance = x * grad, as Explainer."""
    from lxt_ext.attribution import Explainer

    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0)
    model = torch.nn.Sequential(layer, torch.nn.Flatten(), torch.nn.Linear(16 * 5, 4)).eval()
    x = torch.randn(2, 5, 16)
    e = explain_batch(model, x, LanguageTransformer(attention='cp'), target=1)
    with Explainer(model, LanguageTransformer(attention='cp')) as attributor:
        _, expected = attributor(x, 1)[:2]
    torch.testing.assert_close(e.relevance, expected)


def test_explain_yields_the_batches_of_one_registration():
    model, images = small_vit(), torch.rand(5, 3, 32, 32)
    normalise = lambda batch: (batch - 0.5) / 0.5  # noqa: E731
    targets = torch.tensor([0, 1, 2, 3, 4])
    batches = list(explain(model, images, ViTEpsilon(), target=targets, batch_size=2, preprocess=normalise))
    assert [b.relevance.shape[0] for b in batches] == [2, 2, 1]
    whole = explain_batch(model, normalise(images), ViTEpsilon(), target=targets)
    torch.testing.assert_close(torch.cat([b.relevance for b in batches]), whole.relevance, rtol=1e-5, atol=1e-7)
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in model.modules())


@pytest.mark.parametrize('target,top_k,message', [
    (9, None, 'must lie in 0..6'),
    (torch.tensor([1.5, 2.0]), None, 'integer tensor'),
    (None, 8, 'top_k must be between 1 and'),
    (1, 2, 'either target or top_k'),
])
def test_bad_targets_are_clear_errors(target, top_k, message):
    with pytest.raises(ValueError, match=message):
        explain_batch(small_vit(), torch.randn(2, 3, 32, 32), ViTEpsilon(), target=target, top_k=top_k)


def test_bad_inputs_are_clear_errors():
    model = small_vit()
    with Explainer(model, ViTEpsilon()) as explainer:
        with pytest.raises(TypeError, match='floating-point'):
            explainer(torch.zeros(1, 3, 32, 32, dtype=torch.long))
        x = torch.randn(1, 3, 32, 32)
        x[0, 0, 0, 0] = float('nan')
        with pytest.raises(FloatingPointError, match='NaN'):
            explainer(x)


def test_parameters_frozen_while_attributing_and_restored():
    """Relevance needs no weight gradients: inside an attribution no parameter requires grad (so autograd
    keeps no layer inputs for them), after it each has its own flag again, also after an error."""
    from lxt_ext.attribution import Explainer
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
    model[2].bias.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    seen = []
    model[2].register_forward_pre_hook(lambda module, args: seen.append([p.requires_grad for p in model.parameters()]))
    x = torch.randn(2, 6)
    explain_batch(model, x, EpsilonPlus())
    with Explainer(model, LanguageTransformer()) as attributor:
        attributor(x, 0)
        with pytest.raises(ValueError, match='does not match the output'):
            attributor(x, torch.zeros(5))
    assert seen and all(not any(row) for row in seen)
    assert [p.requires_grad for p in model.parameters()] == flags
