"""Reference samples (zennit-crp's relevance and activation maximisation) under lxt_ext's transformer composites
(``lxt_ext.concepts.TransformerFeatureVisualization``).

Oracles, computed without zennit-crp: per sample, ``lxt_ext.attribution.Explainer(model, composite, layers=...)``
for the sample's class (the data set's target), whose ``latent[layer]`` is output x gradient, the relevance; a
plain forward for the activations. A unit's value per sample: summed over tokens (and over a head's channels),
divided by the sample's summed absolute value over the layer's units plus 1e-10 (zennit-crp's ``abs_norm=True``,
its default); the samples are ranked per unit by it. Models: the embedded ViT (float32, its 12 sample images,
normalised) under ``ViTEpsilon`` and ``ViTGamma``, a tiny random LLaMA (float64, input embeddings, last-token
logits) under ``LanguageTransformer``. Every model is checked unchanged after use.
"""
import pytest
import torch
import transformers

from conftest import require_module

crp = require_module('crp')

from lxt_ext.attribution import Explainer  # noqa: E402
from lxt_ext.composites import LanguageTransformer, ViTEpsilon, ViTGamma  # noqa: E402
from lxt_ext.concepts import (HeadConcept, TransformerCondAttribution, TransformerFeatureVisualization,  # noqa: E402
                              concept_layers, input_taps)
from lxt_ext.data import embedded  # noqa: E402

RTOL = {torch.float32: 1e-4, torch.float64: 1e-8}


class LastToken(torch.nn.Module):
    """A causal LM as ``inputs_embeds -> logits at the last token``."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, embeds):
        return self.lm(inputs_embeds=embeds).logits[:, -1]


def vit():
    model = embedded.load_model()
    images, _, labels, _ = embedded.load_samples()
    return model, images, labels, lambda x: (x - embedded.MEAN) / embedded.STD


def llama():
    torch.manual_seed(0)
    lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=4, max_position_embeddings=16, initializer_range=0.2))
    lm = lm.eval().double()
    torch.nn.init.normal_(lm.get_output_embeddings().weight, std=0.5)
    embeds = lm.get_input_embeddings()(torch.randint(0, 32, (12, 5))).detach()
    return LastToken(lm), embeds, torch.randint(0, 32, (12,)), None


CASES = {'vit-epsilon': (vit, lambda: ViTEpsilon()), 'vit-gamma': (vit, lambda: ViTGamma()),
         'llama': (llama, lambda: LanguageTransformer())}


def per_token(tensor, concept):
    """``(samples, tokens, units)``: a head's channels summed."""
    value = tensor.reshape(tensor.shape[0], -1, tensor.shape[-1])
    if isinstance(concept, HeadConcept):
        value = value.reshape(*value.shape[:2], -1, concept.head_dim).sum(-1)
    return value


def per_unit(tensor, concept):
    """``(samples, units)``: summed over tokens (and a head's channels), abs-normalised per sample."""
    value = per_token(tensor, concept).sum(1)
    return value / (value.abs().sum(1, keepdim=True) + 1e-10)


def oracle(model, composite, data, labels, preprocess, layers):
    """Per layer: the relevance (Explainer per sample, its label) and activation per unit, ``(samples, units)``,
    and each unit's most relevant token per sample."""
    names = list(layers.layer_map)
    relevance = {name: [] for name in names}
    with input_taps(model, layers.taps), Explainer(model, composite, layers=names) as explain:
        for x, label in zip(data, labels):
            x = preprocess(x[None]) if preprocess else x[None]
            latent = explain(x, target=torch.tensor([int(label)])).latent
            for name in names:
                relevance[name].append(latent[name])
        # the activations: a plain forward (with the composite registered: lxt_ext's attention rule of
        # nn.MultiheadAttention is what calls its heads tap; the forward values are the model's)
        captured, modules = {}, dict(model.named_modules())  # the taps are modules now
        handles = [modules[name].register_forward_hook(
            lambda module, args, out, name=name: captured.__setitem__(name, out[0] if isinstance(out, tuple) else out))
            for name in names]
        try:
            with torch.enable_grad():  # the rules run where gradients are recorded
                model((preprocess(data) if preprocess else data).clone().requires_grad_())
        finally:
            for handle in handles:
                handle.remove()
    concept = layers.layer_map
    relevance = {name: torch.cat(relevance[name]) for name in names}
    return ({name: per_unit(relevance[name], concept[name]) for name in names},
            {name: per_unit(captured[name].detach(), concept[name]) for name in names},
            {name: per_token(relevance[name], concept[name]).argmax(1) for name in names})


def snapshot(model):
    return ({name: tensor.clone() for name, tensor in model.state_dict().items()},
            [name for name, _ in model.named_modules()],
            sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
                for m in model.modules()))


def assert_ranked(indices, values, expected, dtype):
    """FV's ranking (``(ranks, units)`` indices and values) is the oracle's: its values are the oracle's values
    at its indices, and the indices are the oracle's descending order (ties within the tolerance aside)."""
    scale = expected.abs().max().item()
    tolerance = RTOL[dtype] * scale
    gathered = expected.gather(0, indices.long())
    error = (values.to(expected) - gathered).abs().max().item()
    assert error <= tolerance, f'values: max|diff| = {error:.3e} > {tolerance:.3e}'
    top, order = expected.sort(0, descending=True)
    top = top[:len(indices)]
    assert (gathered - top).abs().max().item() <= tolerance  # each rank holds a sample of the oracle's value there
    separated = torch.ones_like(top, dtype=torch.bool)
    gaps = (expected.sort(0, descending=True)[0][:-1] - expected.sort(0, descending=True)[0][1:]).abs()
    separated[:-1] &= gaps[:len(indices) - 1] > tolerance
    separated[1:] &= gaps[:len(indices) - 1] > tolerance
    assert indices.long()[separated].eq(order[:len(indices)][separated]).all()
    return error, int(indices.long().eq(order[:len(indices)]).sum()), indices.numel()


@pytest.mark.parametrize('case', list(CASES))
def test_reference_samples_match_the_oracle(case, tmp_path):
    build, make_composite = CASES[case]
    torch.set_num_threads(1)
    model, data, labels, preprocess = build()
    layers = concept_layers(model)
    layer_map = {layers.residual[-1]: layers.layer_map[layers.residual[-1]],
                 layers.heads[-1]: layers.layer_map[layers.heads[-1]]}
    if case == 'llama':
        neurons = layers.neurons[0]
        layer_map[neurons] = layers.layer_map[neurons]
    layers = layers._replace(layer_map=layer_map,
                             taps={name: target for name, target in layers.taps.items() if name in layer_map})
    before = snapshot(model)
    expected_relevance, expected_activation, expected_token = oracle(model, make_composite(), data, labels,
                                                                     preprocess, layers)

    attribution = TransformerCondAttribution(model, taps=layers.taps)
    dataset = torch.utils.data.TensorDataset(data, labels)
    fv = TransformerFeatureVisualization(attribution, dataset, layer_map, preprocess_fn=preprocess,
                                         path=tmp_path)
    fv.run(make_composite(), 0, len(dataset), batch_size=5)  # 3 batches: the results are merged across batches

    report = []
    for name in layer_map:
        for mode, expected in (('relevance', expected_relevance[name]), ('activation', expected_activation[name])):
            indices, values, tokens = fv.reference_indices(name, mode, r_range=(0, 8))
            assert indices.shape == (8, expected.shape[1]) and tokens.shape == indices.shape
            error, same, total = assert_ranked(indices, values, expected, data.dtype)
            if mode == 'relevance':  # the "receptive field": the unit's most relevant token in that sample
                assert tokens.long().eq(expected_token[name].gather(0, indices.long())).all()
            report.append(f'{name} {mode}: max|diff| {error:.1e}, same index {same}/{total}')
    print(case, *report, sep='\n')

    # get_max_reference: the top samples themselves (before preprocessing)
    name = layers.residual[-1]
    indices = fv.reference_indices(name, 'relevance', r_range=(0, 3))[0]
    references = fv.get_max_reference([0, 1], name, 'relevance', r_range=(0, 3), plot_fn=None)
    for unit in (0, 1):
        torch.testing.assert_close(references[unit], data[indices[:, unit].long()], rtol=0, atol=0)

    # conditional heatmaps of the reference samples: the unit's relevance from the layer (its activation), masked
    # by the layer's concept (zennit-crp's default mask would mask tokens), as a direct call gives them
    if case != 'llama':
        composite = make_composite()
        samples, heatmaps = fv.get_max_reference(3, name, 'relevance', r_range=(0, 2), composite=composite,
                                                 plot_fn=None)[3]
        direct = attribution(preprocess(samples).requires_grad_(), [{name: [3]}], composite, start_layer=name,
                             mask_map={name: layer_map[name].mask}, exclude_parallel=False).heatmap
        assert heatmaps.shape == (2, *data.shape[2:])
        torch.testing.assert_close(heatmaps, direct, rtol=0, atol=0)

    after = snapshot(model)
    assert before[1] == after[1] and before[2] == after[2]
    assert all(torch.equal(before[0][key], after[0][key]) for key in before[0])
