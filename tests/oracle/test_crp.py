"""zennit-crp 0.6 (concept relevance propagation) with every lxt_ext composite (``lxt_ext.concepts``).

Oracles, computed without zennit-crp: plain autograd with the same composite registered, where a layer's
relevance is its output times its gradient (Gradient x Input convention), the relevance through a branch is
the heatmap minus the heatmap with that branch's gradient zeroed, and a relevance given at a layer enters as
``R / stab(a)`` (0 where ``a == 0``), written out here; conservation (CP-LRP, offsets zeroed as
``lxt_ext.diagnostics.conservation.zeroed`` zeroes them): the relevance at the residual stream and the heatmap sum
to the seeded relevance. Models: lxt_ext's embedded ViT (float32), tiny random-weight LLaMA and GPT-2 (float64)
explained at the last token w.r.t. their input embeddings, VGG-11 with random weights against zennit's own
composite. Every model is checked unchanged after use.
"""
import pytest
import torch
import torchvision
import transformers
import zennit.composites

from conftest import assert_rel_close, require_module

crp = require_module('crp')

from crp.attribution import CondAttribution  # noqa: E402

import lxt_ext  # noqa: E402
import lxt_ext.composites  # noqa: E402
from lxt_ext.composites import LanguageTransformer, ViTEpsilon, ViTGamma  # noqa: E402
from lxt_ext.concepts import (HeadConcept, HiddenConcept, TransformerCondAttribution, concept_layers,  # noqa: E402
                              input_taps, relevance_to_gradient)
from lxt_ext.data import embedded  # noqa: E402
from lxt_ext.diagnostics.conservation import zeroed  # noqa: E402

STABILIZER = 1e-10  # the composites' input_stabilizer


class LastToken(torch.nn.Module):
    """A causal LM as ``inputs_embeds -> logits at the last token``, ``(batch, vocabulary)``."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, embeds):
        return self.lm(inputs_embeds=embeds).logits[:, -1]


def vit():
    model = embedded.load_model()
    images, _, labels, _ = embedded.load_samples()
    return model, ((images[:2] - embedded.MEAN) / embedded.STD)


def language_model(family):
    torch.manual_seed(0)
    if family == 'llama':
        lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=4, max_position_embeddings=16, initializer_range=0.2))
    else:
        lm = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=32, n_embd=16, n_layer=2, n_head=4, n_positions=16, bos_token_id=0, eos_token_id=0,
            initializer_range=0.2))  # branches with shares of the relevance (the default 0.02 leaves them tiny)
    lm = lm.eval().double()
    torch.nn.init.normal_(lm.get_output_embeddings().weight, std=0.5)  # logits well away from zero
    embeds = lm.get_input_embeddings()(torch.randint(0, 32, (2, 5))).detach()
    return LastToken(lm), embeds


MODELS = {'vit': vit, 'llama': lambda: language_model('llama'), 'gpt2': lambda: language_model('gpt2')}


def composite_for(name, attention='cp'):
    """Epsilon (near 0) with ``attention``; ``'gamma'``: the gamma rules (ViTGamma's recipe, CP-LRP)."""
    if attention == 'gamma':
        return ViTGamma() if name == 'vit' else LanguageTransformer(attention='cp', gamma=0.05)
    if name == 'vit':
        return ViTEpsilon(epsilon=1e-9, attention=attention)
    return LanguageTransformer(attention=attention, epsilon=1e-12)


# max|actual - expected| <= RTOL * max|expected|; sums: |sum - expected| <= RTOL * (summed |relevance|). What the
# bounds leave room for: float32 rounding in the embedded ViT; in float64 the transformer rules' backward is linear
# in the arriving gradient to about 1e-8 only (sums of conditional heatmaps against the unconditional one).
RTOL = {torch.float32: 1e-5, torch.float64: 1e-6}


def close(actual, expected, scale=None):
    """``assert_rel_close`` at ``RTOL``; ``scale`` (a tensor) replaces ``max|expected|``, for a difference of
    heatmaps, whose rounding is the heatmaps'."""
    if scale is None:
        return assert_rel_close(actual, expected, RTOL[expected.dtype])
    error, bound = (actual - expected).abs().max().item(), RTOL[expected.dtype] * scale.abs().max().item()
    assert error <= bound, f'max|diff| = {error:.3e} > {bound:.3e}'


def sums_to(relevance, expected):
    """Each row of ``relevance`` sums to ``expected`` (its summed absolute value the scale)."""
    total, mass = relevance.flatten(1).sum(1), relevance.flatten(1).abs().sum(1)
    error = (total - expected).abs()
    assert (error <= RTOL[relevance.dtype] * mass).all(), (total, expected, mass)


@pytest.fixture(scope='module', params=list(MODELS))
def case(request):
    model, x = MODELS[request.param]()
    return request.param, model, x, concept_layers(model)


def top_classes(model, x):
    with torch.no_grad():
        logits = model(x)
    target = logits.argmax(1)
    return target, logits.gather(1, target[:, None])[:, 0]


def seed_of(target):
    """zennit-crp's output seed: the prediction's value at the target (relevance summing to the logit)."""
    def seed(y):
        return y.detach() * torch.nn.functional.one_hot(target, y.shape[1]).to(y.dtype)
    return seed


def heatmap_of(composite, x, grad):
    """The oracle's heatmap: the input gradient summed over channels where the first layer emits relevance
    (ViT), else ``x * grad`` summed over the embedding dimension."""
    return grad.sum(1) if isinstance(composite, (ViTEpsilon, ViTGamma)) else (x * grad).sum(-1)


def plain(model, x, composite, seed=None, outputs=(), inputs=(), grad_hooks=None, start=None, start_relevance=None):
    """Plain autograd with ``composite`` registered, no zennit-crp: ``(heatmap, {name: tensor * its gradient})``
    for the modules' outputs named in ``outputs`` and the (first) inputs of those in ``inputs``. ``grad_hooks``
    maps such a name to a hook that changes the gradient arriving there. ``start``: the backward starts at that
    output with the gradient that carries ``start_relevance`` (default the activation), written out."""
    grad_hooks = grad_hooks or {}
    x = x.detach().clone().requires_grad_()
    modules = dict(model.named_modules())
    captured, handles = {}, []

    def keep(name, tensor):
        tensor.retain_grad()
        captured[name] = tensor
        if name in grad_hooks:
            tensor.register_hook(grad_hooks[name])

    def output_hook(name):
        def hook(module, args, output):
            keep(name, output[0] if isinstance(output, tuple) else output)
        return hook

    def input_hook(name):
        def hook(module, args):
            keep(name, args[0])
        return hook

    with composite.context(model) as modified:
        handles += [modules[name].register_forward_hook(output_hook(name)) for name in outputs]
        handles += [modules[name].register_forward_pre_hook(input_hook(name)) for name in inputs]
        try:
            y = modified(x)
            if start is None:
                y.backward(seed(y))
            else:
                a = captured[start].detach()
                relevance = a if start_relevance is None else start_relevance
                gradient = torch.where(a == 0, torch.zeros_like(a), relevance / (a + STABILIZER * a.sign()))
                captured[start].backward(gradient)
        finally:
            for handle in handles:
                handle.remove()
    relevances = {name: (tensor * tensor.grad).detach() for name, tensor in captured.items()}
    return heatmap_of(composite, x, x.grad).detach(), relevances


def crp_call(model, x, conditions, composite, layers, **kwargs):
    attribution = TransformerCondAttribution(model, taps=layers.taps)
    kwargs.setdefault('mask_map', layers.mask_map)
    return attribution(x.detach().clone().requires_grad_(), conditions, composite, **kwargs)


def branch_oracles(name, layers, block):
    """``(neurons, heads)``: each as ``(crp layer name, plain() keyword arguments naming that tensor)``."""
    neurons, heads = layers.neurons[block], layers.heads[block]
    if name == 'vit':  # neurons: the activation's output; heads: all of the attention branch, the MHA's output
        return (neurons, {'outputs': [neurons]}), (heads, {'outputs': [heads.rpartition('.')[0]]})
    return ((neurons, {'inputs': [layers.taps[neurons]]}), (heads, {'inputs': [layers.taps[heads]]}))


# (a) layer relevances = activation x gradient; (d) the class heatmap sums to the logit

@pytest.mark.parametrize('attention', ['cp', 'attnlrp', 'gamma'])
def test_layer_relevances_are_activation_times_gradient(case, attention):
    name, model, x, layers = case
    composite = composite_for(name, attention)
    target, _ = top_classes(model, x)
    conditions = [{'y': [int(t)]} for t in target]
    recorded = layers.residual + layers.neurons + layers.heads
    result = crp_call(model, x, conditions, composite, layers, record_layer=recorded)
    by_tensor = {name: layers.taps.get(name, name) for name in recorded}
    if name == 'vit':  # the ViT's heads: the tap only (nn.MultiheadAttention computes out_proj functionally)
        by_tensor = {k: v for k, v in by_tensor.items() if k not in layers.heads}
    outputs = [v for k, v in by_tensor.items() if k not in layers.taps]
    inputs = [v for k, v in by_tensor.items() if k in layers.taps]
    heatmap, expected = plain(model, x, composite, seed_of(target), outputs=outputs, inputs=inputs)
    close(result.heatmap, heatmap)
    for layer, tensor in by_tensor.items():
        assert result.relevances[layer].shape == expected[tensor].shape
        close(result.relevances[layer], expected[tensor])


def test_residual_stream_and_heatmap_sum_to_the_logit(case):
    """CP-LRP with the offsets zeroed: every rule conserves, so the relevance of each block's output, every path
    passing it, and the heatmap sum to the seeded relevance (the logit); the heads' relevance sums to the
    attention output's."""
    name, model, x, layers = case
    composite = composite_for(name)
    with zeroed(model):
        target, logit = top_classes(model, x)
        attention = [head.rpartition('.')[0] for head in layers.heads]
        result = crp_call(model, x, [{'y': [int(t)]} for t in target], composite, layers,
                          record_layer=layers.residual + layers.heads)
        _, outputs = plain(model, x, composite, seed_of(target), outputs=attention)
    assert result.heatmap.shape == ((2, 64, 64) if name == 'vit' else (2, 5))
    sums_to(result.heatmap, logit)
    for block in layers.residual:
        sums_to(result.relevances[block], logit)
    for heads, output in zip(layers.heads, attention):
        sums_to(result.relevances[heads], outputs[output].flatten(1).sum(1))


# (b) conditional heatmaps add up

def test_conditional_heatmaps_of_all_channels_add_up_to_the_heatmap(case):
    """At the residual stream (the first block's output) the heatmaps of every hidden channel add up to the
    unconditional heatmap; the recorded relevance of channel c is the unconditional relevance at c."""
    name, model, x, layers = case
    composite = composite_for(name, 'attnlrp')
    target, _ = top_classes(model, x[:1])
    block = layers.residual[0]
    hidden = model.lm.config.hidden_size if name != 'vit' else model.hidden_dim
    conditions = [{block: [c], 'y': [int(target)]} for c in range(hidden)]
    result = crp_call(model, x[:1], conditions, composite, layers, record_layer=[block])
    heatmap, relevance = plain(model, x[:1], composite, seed_of(target), outputs=[block])
    close(result.heatmap.sum(0, keepdim=True), heatmap)
    per_channel = result.relevances[block][torch.arange(hidden), ..., torch.arange(hidden)]  # (channels, tokens)
    close(per_channel.T, relevance[block][0])
    concept = layers.layer_map[block]
    close(concept.attribute(result.relevances[block], abs_norm=False).diagonal(),
                               relevance[block][0].sum(0))


@pytest.mark.parametrize('branch', ['neurons', 'heads'])
def test_conditional_heatmaps_of_a_branch_add_up_to_its_share(case, branch):
    """At a branch (the last block's MLP neurons or attention heads) the heatmaps of all its concepts add up to
    the branch's share: the heatmap minus the heatmap with the branch's gradient zeroed."""
    name, model, x, layers = case
    composite = composite_for(name, 'attnlrp')
    target, _ = top_classes(model, x[:1])
    neurons, heads = branch_oracles(name, layers, -1)
    layer, where = neurons if branch == 'neurons' else heads
    count = (layers.layer_map[layer].head_dim if branch == 'heads' else 1)
    width = {'vit': {'neurons': 128, 'heads': 64}, 'llama': {'neurons': 32, 'heads': 16},
             'gpt2': {'neurons': 64, 'heads': 16}}[name][branch] // count
    conditions = [{layer: [c], 'y': [int(target)]} for c in range(width)]
    result = crp_call(model, x[:1], conditions, composite, layers)
    full, _ = plain(model, x[:1], composite, seed_of(target))
    tensor = next(iter(where.values()))[0]
    without, _ = plain(model, x[:1], composite, seed_of(target), grad_hooks={tensor: torch.zeros_like}, **where)
    share = full - without
    assert share.abs().max() > 1e-3 * full.abs().max()  # the branch takes a share: the check is not vacuous
    close(result.heatmap.sum(0, keepdim=True), share, scale=full)


@pytest.mark.parametrize('family', ['llama', 'gpt2'])
def test_one_head_equals_the_heatmap_through_that_head(family):
    """One head's conditional heatmap (zennit-crp's ``exclude_parallel``: the relevance through that head only)
    against the heatmap with the gradient masked to that head's channels at the output projection's input (a
    forward pre-hook, no tap) minus the heatmap with all heads' gradient zeroed (what does not pass them)."""
    model, x = MODELS[family]()
    layers = concept_layers(model)
    composite = composite_for(family, 'attnlrp')
    target, _ = top_classes(model, x)
    heads = layers.heads[0]
    head_dim = layers.layer_map[heads].head_dim
    for head in range(4):
        result = crp_call(model, x, [{heads: [head], 'y': [int(t)]} for t in target], composite, layers)
        mask = torch.zeros(4 * head_dim, dtype=x.dtype)
        mask[head * head_dim:(head + 1) * head_dim] = 1
        tensor = layers.taps[heads]
        masked, _ = plain(model, x, composite, seed_of(target), inputs=[tensor],
                          grad_hooks={tensor: lambda g: g * mask})
        without, _ = plain(model, x, composite, seed_of(target), inputs=[tensor],
                           grad_hooks={tensor: torch.zeros_like})
        close(result.heatmap, masked - without, scale=masked)


def test_conditions_on_two_layers():
    """A condition on two residual-stream layers (the later one first, as zennit-crp asks with
    ``exclude_parallel``): over all channels of the earlier layer the heatmaps add up to the later layer's
    condition alone, and each recorded layer's relevance is its masked relevance, counted once."""
    model, x = MODELS['llama']()
    layers = concept_layers(model)
    composite = composite_for('llama', 'attnlrp')
    target, _ = top_classes(model, x[:1])
    late, early = layers.residual[1], layers.residual[0]
    single = crp_call(model, x[:1], [{late: [3], 'y': [int(target)]}], composite, layers, record_layer=[late, early])
    chain = crp_call(model, x[:1], [{late: [3], early: [c], 'y': [int(target)]} for c in range(16)], composite, layers,
                     record_layer=[late, early])
    close(chain.heatmap.sum(0, keepdim=True), single.heatmap)
    close(chain.relevances[late], single.relevances[late].expand(16, -1, -1))
    close(chain.relevances[early][torch.arange(16), :, torch.arange(16)].T, single.relevances[early][0])
    assert single.relevances[late][..., :3].eq(0).all() and single.relevances[late][..., 3].ne(0).any()


def test_channel_at_tokens_condition(case):
    """``HiddenConcept.mask_rf``: a channel kept at some tokens only (of a residual-stream layer): its recorded
    relevance is the unconditional relevance there and zero elsewhere."""
    name, model, x, layers = case
    composite = composite_for(name)
    target, _ = top_classes(model, x[:1])
    block = layers.residual[0]
    tokens = [0, 2, 4]
    result = crp_call(model, x[:1], [{block: {5: tokens}, 'y': [int(target)]}], composite, layers,
                      mask_map=HiddenConcept.mask_rf, record_layer=[block])
    _, relevance = plain(model, x[:1], composite, seed_of(target), outputs=[block])
    expected = torch.zeros_like(relevance[block])
    expected[0, tokens, 5] = relevance[block][0, tokens, 5]
    close(result.relevances[block], expected)


# (c) start_layer

@pytest.mark.parametrize('given', ['activations', 'random'])
def test_start_layer_takes_relevance(case, given):
    """A heatmap from a layer's relevance (zennit-crp's default, the activations, or a random relevance of
    either sign) equals plain autograd seeded there with ``R / stab(a)`` (0 where
    ``a == 0``); with CP-LRP and the offsets zeroed it sums to the relevance given; the relevance recorded at the
    start layer is the one given; the heatmaps of all its channels add up to it."""
    name, model, x, layers = case
    composite = composite_for(name)
    block = layers.residual[0]
    with zeroed(model):
        with torch.no_grad():
            activation = {}
            handle = dict(model.named_modules())[block].register_forward_hook(
                lambda m, a, out: activation.setdefault('a', out))
            model(x)
            handle.remove()
        a = activation['a']
        relevance = None
        if given == 'random':
            # a relevance of either sign: the activations times factors in [-1, 2]
            relevance = a * (torch.rand(a.shape, generator=torch.Generator().manual_seed(0), dtype=a.dtype) * 3 - 1)
        kwargs = {} if relevance is None else {'init_rel': relevance}
        result = crp_call(model, x, [{}, {}], composite, layers, start_layer=block, record_layer=[block], **kwargs)
        heatmap, _ = plain(model, x, composite, outputs=[block], start=block, start_relevance=relevance)
        given_relevance = a if relevance is None else relevance
        close(result.heatmap, heatmap)
        sums_to(result.heatmap, given_relevance.flatten(1).sum(1))
        stabilized = torch.where(a == 0, torch.zeros_like(a), given_relevance * a / (a + STABILIZER * a.sign()))
        close(result.relevances[block], stabilized)
        hidden = a.shape[-1]
        channels = crp_call(model, x[:1], [{block: [c]} for c in range(hidden)], composite, layers, start_layer=block,
                            **({} if relevance is None else {'init_rel': relevance[:1].expand(hidden, *a.shape[1:])}))
        close(channels.heatmap.sum(0), result.heatmap[0])


def test_relevance_at_zero_activations_is_dropped():
    a = torch.tensor([2.0, 0.0, -4.0])
    g = relevance_to_gradient(torch.tensor([1.0, 5.0, 1.0]), a)
    assert g.tolist() == [0.5, 0.0, -0.25]


# (e) a language model's token heatmap

@pytest.mark.parametrize('family', ['llama', 'gpt2'])
def test_language_model_token_heatmap_is_explain_batchs(family):
    model, x = MODELS[family]()
    layers = concept_layers(model)
    composite = composite_for(family, 'attnlrp')
    target, _ = top_classes(model, x)
    result = crp_call(model, x, [{'y': [int(t)]} for t in target], composite, layers)
    assert result.heatmap.shape == (2, 5)
    e = lxt_ext.explain_batch(model, x, composite, target=target)
    close(result.heatmap, e.relevance.sum(-1))


def test_generate_equals_call(case):
    """zennit-crp's ``generate`` (the conditions in batches over one forward) gives ``__call__``'s heatmaps."""
    name, model, x, layers = case
    composite = composite_for(name, 'attnlrp')
    target, _ = top_classes(model, x[:1])
    heads = layers.heads[0]
    conditions = [{heads: [h], 'y': [int(target)]} for h in range(4)]
    attribution = TransformerCondAttribution(model, taps=layers.taps)
    generated = list(attribution.generate(x[:1].clone().requires_grad_(), conditions, composite, record_layer=[heads],
                                          mask_map=layers.mask_map, batch_size=3, verbose=False))
    called = attribution(x[:1].clone().requires_grad_(), conditions, composite, record_layer=[heads],
                         mask_map=layers.mask_map)
    close(torch.cat([g.heatmap for g in generated]), called.heatmap)
    close(torch.cat([g.relevances[heads] for g in generated]), called.relevances[heads])
    assert heads not in dict(model.named_modules())  # the taps are gone once the generator is done


# (f) CNN composites: zennit-crp's own behaviour

def test_cnn_composite_gives_zennits_conditional_relevance():
    torch.manual_seed(0)
    model = torchvision.models.vgg11(weights=None).eval()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    layer = 'features.13'
    conditions = [{'y': [7]}] + [{layer: [c], 'y': [7]} for c in (3, 100, 400)]
    record = ['features.3', layer, 'classifier.0']

    def run(attribution, composite):
        return attribution(x.clone().requires_grad_(), conditions, composite, record_layer=record)

    zennits = run(CondAttribution(model), zennit.composites.EpsilonPlusFlat())
    ours = run(CondAttribution(model), lxt_ext.composites.EpsilonPlusFlat())
    adapter = run(TransformerCondAttribution(model), lxt_ext.composites.EpsilonPlusFlat())
    assert_rel_close(ours.heatmap, zennits.heatmap, 1e-4)
    for name in record:
        assert_rel_close(ours.relevances[name], zennits.relevances[name], 1e-4)
    # the adapter with a CNN composite is zennit-crp's CondAttribution, bit for bit
    assert torch.equal(adapter.heatmap, ours.heatmap)
    assert all(torch.equal(adapter.relevances[n], ours.relevances[n]) for n in record)


# (g) the model is unchanged

def snapshot(model):
    modules = list(model.named_modules())
    return {'modules': [(name, type(module)) for name, module in modules],
            'state': {k: v.clone() for k, v in model.state_dict().items()},
            'grad': [(n, p.requires_grad, p.grad) for n, p in model.named_parameters()],
            'hooks': [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
                       'forward' in m.__dict__, m.training) for _, m in modules]}


def test_model_is_unchanged_after_use(case):
    name, model, x, layers = case
    attribution = TransformerCondAttribution(model, taps=layers.taps)  # switches requires_grad off, as zennit-crp
    before = snapshot(model)
    with torch.no_grad():
        output = model(x)
    target, _ = top_classes(model, x)
    composite = composite_for(name)
    conditions = [{heads: [1], 'y': [int(t)]} for heads, t in zip(layers.heads[:1] * 2, target)]
    attribution(x.clone().requires_grad_(), conditions, composite, record_layer=layers.residual + layers.neurons,
                mask_map=layers.mask_map)
    attribution(x.clone().requires_grad_(), [{}, {}], composite, start_layer=layers.residual[0],
                record_layer=layers.heads)
    list(attribution.generate(x[:1].clone().requires_grad_(), [{layers.heads[0]: [0], 'y': [0]}], composite,
                              mask_map=layers.mask_map, verbose=False))
    after = snapshot(model)
    assert after['modules'] == before['modules'] and after['hooks'] == before['hooks']
    assert after['grad'] == before['grad']
    assert all(torch.equal(after['state'][k], v) for k, v in before['state'].items())
    with torch.no_grad():
        assert torch.equal(model(x), output)


def test_taps_change_nothing_but_the_names(case):
    """Inside ``input_taps`` the model computes the same output and heatmap; the taps' outputs are the inputs of
    the modules they tap."""
    name, model, x, layers = case
    composite = composite_for(name)
    target, _ = top_classes(model, x)
    heatmap, _ = plain(model, x, composite, seed_of(target))
    inputs = [target for tap, target in layers.taps.items() if not (name == 'vit' and tap in layers.heads)]
    with input_taps(model, layers.taps) as names:
        assert set(names) <= set(dict(model.named_modules()))
        tapped, relevances = plain(model, x, composite, seed_of(target), outputs=names, inputs=inputs)
    torch.testing.assert_close(tapped, heatmap, rtol=0, atol=0)
    for tap, target in layers.taps.items():
        if target in relevances:
            assert torch.equal(relevances[tap], relevances[target])
    assert not set(layers.taps) & set(dict(model.named_modules()))


def test_taps_refuse_a_sequential_or_a_taken_name():
    model, _ = vit()
    with pytest.raises(ValueError, match='Sequential'):
        with input_taps(model, {'encoder.layers.encoder_layer_0.mlp.tap': 'encoder.layers.encoder_layer_0.mlp.3'}):
            pass
    with pytest.raises(ValueError, match='already'):
        with input_taps(model, {'encoder.layers.encoder_layer_0.mlp': 'encoder.layers.encoder_layer_0.ln_2'}):
            pass
    assert [n for n, _ in model.named_modules()] == [n for n, _ in vit()[0].named_modules()]


def test_concepts_on_a_tensor():
    relevance = torch.arange(2 * 3 * 8, dtype=torch.float64).reshape(2, 3, 8)
    hidden, heads = HiddenConcept(), HeadConcept(head_dim=2)
    torch.testing.assert_close(hidden.attribute(relevance, abs_norm=False), relevance.sum(1))
    torch.testing.assert_close(heads.attribute(relevance, abs_norm=False),
                               relevance.sum(1).reshape(2, 4, 2).sum(-1))
    normed = heads.attribute(relevance)
    torch.testing.assert_close(normed.abs().sum(1), torch.ones(2, dtype=torch.float64))
    grad = torch.ones(2, 3, 8)
    masked = heads.mask(1, [0, 3])(grad.clone())
    assert masked[0].eq(1).all() and masked[1][:, [0, 1, 6, 7]].eq(1).all() and masked[1][:, 2:6].eq(0).all()
    masked = heads.mask_rf(0, {2: [1]})(grad.clone())
    assert masked[0].sum() == 2 and masked[0, 1, 4:6].eq(1).all() and masked[1].eq(1).all()
    masked = hidden.mask(0, [7])(grad.clone())
    assert masked[0].sum() == 3 and masked[0, :, 7].eq(1).all()
    with pytest.raises(ValueError, match='whole heads'):
        HeadConcept(3).attribute(relevance)
    order, value, token = heads.reference_sampling(-relevance, abs_norm=False)  # the samples ranked per head
    per_head = -relevance.sum(1).reshape(2, 4, 2).sum(-1)
    assert order.eq(torch.tensor([[0] * 4, [1] * 4])).all() and token.eq(0).all()
    torch.testing.assert_close(value, per_head)
    assert hidden.get_rf_indices((3, 8)).tolist() == [0, 1, 2]
