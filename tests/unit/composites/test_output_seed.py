"""The seed at the model's output is relevance (zennit's convention) for every composite, CNN, ViT and
language model alike, and lxt_ext's own entry points seed the explained logit.

The oracle is conservation: with the offsets zeroed (biases, class token, position table) and CP-LRP every
rule is conservative, so the input relevance sums to the relevance given at the output. With zennit's own
``Gradient`` attributor a one-hot seed therefore gives relevance summing to 1 and ``y * one_hot`` to the
logit ``y``, whatever its sign; the classes explained here are each row's lowest (negative) logit and its
highest, so a sign flip cannot pass.
"""
import numpy as np
import pytest
import torch
import torchvision
import transformers
from zennit.attribution import Gradient

from lxt_ext.composites import EpsilonPlus, LanguageTransformer, ViTEpsilon, ViTGamma
from lxt_ext.attribution import Explainer, explain_batch
from lxt_ext.attribution.interop import LRP, quantus_explain


def cnn():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3),
                                torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 5)).eval()
    with torch.no_grad():
        for module in model:
            if hasattr(module, 'bias'):
                module.bias.zero_()
    return model, torch.randn(2, 3, 8, 8), EpsilonPlus(epsilon=1e-9)


def vit():
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16,
                                                 mlp_dim=32, num_classes=5).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith('bias') or name in ('class_token', 'encoder.pos_embedding'):
                parameter.zero_()
        torch.nn.init.normal_(model.heads.head.weight, std=0.5)  # torchvision zero-initialises the head
    return model, torch.randn(2, 3, 16, 16), ViTEpsilon(epsilon=1e-9, attention='cp')


class LastToken(torch.nn.Module):
    """A LLaMA explained w.r.t. its input embeddings: the logits at the last token, (batch, vocabulary)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=8, max_position_embeddings=16)).eval().double()

    def forward(self, embeds):
        return self.model(inputs_embeds=embeds).logits[:, -1]


def language_model():
    model = LastToken()
    embeds = model.model.get_input_embeddings()(torch.randint(0, 32, (2, 5))).detach()
    return model, embeds, LanguageTransformer(attention='cp', epsilon=1e-10)


MODELS = {'cnn': cnn, 'vit': vit, 'language': language_model}


def classes(model, x):
    """Each row's lowest-logit class (negative) and highest, and the logits."""
    with torch.no_grad():
        logits = model(x)
    low, high = logits.argmin(1), logits.argmax(1)
    assert (logits.gather(1, low[:, None]) < 0).all() and (logits.gather(1, high[:, None]) > 0).all()
    return logits, low, high


def input_relevance(model, composite, x, seed):
    """zennit's own attributor; relevance is its result, or ``x * grad`` where no first layer emits relevance
    (text models explained w.r.t. their embeddings)."""
    with Gradient(model, composite) as attributor:
        _, grad = attributor(x, seed)
    emits = not isinstance(composite, LanguageTransformer)
    return grad if emits else x * grad


def rows(relevance):
    return relevance.flatten(1).sum(1)


@pytest.mark.parametrize('name', list(MODELS))
def test_zennits_attributor_reads_the_seed_as_relevance(name):
    model, x, composite = MODELS[name]()
    logits, low, high = classes(model, x)
    for target in (low, high):
        one_hot = torch.nn.functional.one_hot(target, logits.shape[1]).to(logits.dtype)
        ones = rows(input_relevance(model, composite, x, one_hot))
        torch.testing.assert_close(ones, torch.ones_like(ones), rtol=1e-4, atol=1e-4)
        explained = rows(input_relevance(model, composite, x, lambda y: y * one_hot))
        torch.testing.assert_close(explained, logits.gather(1, target[:, None])[:, 0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('name', list(MODELS))
def test_every_entry_point_sums_to_the_explained_logit(name):
    model, x, composite = MODELS[name]()
    logits, low, high = classes(model, x)
    for target in (low, high):
        expected = logits.gather(1, target[:, None])[:, 0]
        e = explain_batch(model, x, composite, target=target)
        torch.testing.assert_close(e.score, expected)
        torch.testing.assert_close(rows(e.relevance), expected, rtol=1e-4, atol=1e-6)
        with Explainer(model, composite) as explainer:
            torch.testing.assert_close(rows(explainer(x, target).relevance), expected, rtol=1e-4, atol=1e-6)
        with Explainer(model, composite) as attributor:
            for row in range(x.shape[0]):
                _, relevance = attributor(x[row:row + 1], int(target[row]))[:2]
                torch.testing.assert_close(relevance.sum(), expected[row], rtol=1e-4, atol=1e-6)
        if name != 'language':  # image interop: Captum's and Quantus's conventions
            captum = LRP(model, composite).attribute(x, target=target)
            torch.testing.assert_close(rows(captum), expected, rtol=1e-4, atol=1e-6)
            quantus = quantus_explain(model, x.numpy(), target.numpy(), composite=composite)
            np.testing.assert_allclose(quantus.reshape(len(x), -1).sum(1), expected.numpy(), rtol=1e-4, atol=1e-6)


def test_prediction_seed_as_zennit_crp_gives_the_logit_not_its_square():
    """zennit-crp seeds the prediction's value (``y * one_hot``): a ViT's class heatmap sums to the logit, as
    a CNN's does (before 0.3, a ViT's summed to ``y**2``)."""
    model, x, _ = vit()
    logits, low, _ = classes(model, x)
    one_hot = torch.nn.functional.one_hot(low, logits.shape[1]).to(logits.dtype)
    for composite in (ViTEpsilon(epsilon=1e-9, attention='cp'), ViTGamma(attention='cp', conv_gamma=0., linear_gamma=0.,
                                                                         stabilizer=1e-9)):
        relevance = rows(input_relevance(model, composite, x, lambda y: y * one_hot))
        torch.testing.assert_close(relevance, logits.gather(1, low[:, None])[:, 0], rtol=1e-4, atol=1e-6)


def test_inactive_composite_gives_the_plain_gradient():
    """zennit's ``Composite.inactive`` switches every hook off, the output's conversion included."""
    model, x, composite = vit()
    seed = torch.nn.functional.one_hot(torch.tensor([1, 3]), 5).float()
    xg = x.clone().requires_grad_()
    (plain,) = torch.autograd.grad(model(xg), xg, seed)
    with composite.context(model) as modified, composite.inactive():
        xg = x.clone().requires_grad_()
        (inactive,) = torch.autograd.grad(modified(xg), xg, seed)
    torch.testing.assert_close(inactive, plain)
