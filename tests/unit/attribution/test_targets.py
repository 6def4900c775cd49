"""lxt_ext.targets.contrastive: the seed against the explicit formula (LXT's gradient mask, 1 at the chosen
class, -1/(C-1) at every other class, at the explained position only, times the output: the seed is
relevance), and the relevance it gives: under CP-LRP with no
biases (LLaMA), the input relevance sums to z_t - mean_{j != t} z_j of the logits computed directly."""
import pytest
import torch
import transformers

from lxt_ext.attribution import Explainer
from lxt_ext.composites import LanguageTransformer
from lxt_ext.attribution.targets import contrastive


def explicit_mask(output, targets, position):
    """LXT's mask, element by element."""
    seed = torch.zeros_like(output)
    classes = output.shape[-1]
    for b in range(output.shape[0]):
        for c in range(classes):
            value = 1. if c == targets[b] else -1. / (classes - 1)
            if output.dim() == 3:
                seed[b, position, c] = value
            else:
                seed[b, c] = value
    return seed


def explicit_seed(output, targets, position):
    return explicit_mask(output, targets, position) * output


def test_seed_is_the_formula():
    output = torch.randn(3, 4, 7, generator=torch.Generator().manual_seed(0))
    assert torch.equal(contrastive(2)(output), explicit_seed(output, [2, 2, 2], -1))
    assert torch.equal(contrastive(torch.tensor([0, 6, 3]), position=1)(output), explicit_seed(output, [0, 6, 3], 1))
    top = output[:, -1].argmax(-1).tolist()
    assert torch.equal(contrastive()(output), explicit_seed(output, top, -1))
    flat = output[:, 0]
    assert torch.equal(contrastive(5)(flat), explicit_seed(flat, [5, 5, 5], None))
    assert explicit_mask(flat, [5, 5, 5], None).sum().item() == pytest.approx(0., abs=1e-6)  # sums to zero per row


def test_bad_targets_are_named():
    with pytest.raises(IndexError, match='out of range for 7 classes'):
        contrastive(7)(torch.zeros(2, 7))
    with pytest.raises(ValueError, match='at least two classes'):
        contrastive(0)(torch.zeros(2, 1))
    with pytest.raises(ValueError, match=r'\(batch, classes\)'):
        contrastive(0)(torch.zeros(7))


def test_relevance_sums_to_the_contrast_of_the_logits():
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, head_dim=8)).eval().double()
    embeds = model.get_input_embeddings()(torch.randint(0, 64, (2, 6))).detach()  # float64: the contrast is small
    forward = lambda m, x: m(inputs_embeds=x).logits  # noqa: E731
    # epsilon's absorption (eps / |z|) kept below the tolerance: the random logits are small
    composite = LanguageTransformer(attention='cp', epsilon=1e-10)
    with Explainer(model, composite, forward=forward) as attributor:
        logits, relevance = attributor(embeds, contrastive(torch.tensor([5, 9])))[:2]
    last = model(inputs_embeds=embeds).logits[:, -1].detach()
    chosen = last[torch.arange(2), torch.tensor([5, 9])]
    others = (last.sum(-1) - chosen) / 63
    contrast = chosen - others
    assert contrast.abs().min() > 1e-3  # not vacuous
    assert relevance.sum((1, 2)).tolist() == pytest.approx(contrast.tolist(), rel=1e-5)
    # not the one-hot explanation of the same logit
    with Explainer(model, composite, forward=forward) as attributor:
        _, onehot = attributor(embeds, 5)[:2]
    assert onehot[0].sum().item() == pytest.approx(chosen[0].item(), rel=1e-5)
    assert not torch.allclose(onehot[0], relevance[0], atol=1e-3)
