"""The Gradient x Input rules of lxt_ext.transformer against explicit formulas and zennit.

Each reference is the rule written out in plain autograd: the identity rule as ``g f(x)/stab(x)``,
the norm rules as autograd through the normalisation with ``rstd`` detached, the uniform rule as
``g b/2`` and ``g a/2``, epsilon as ``W^T (g y/stab(y))`` through a detached ratio, AttnLRP as the
plain attention with the gradients of q, k, v scaled by 1/4, 1/4, 1/2 (CP: q and k detached), and
zennit's rules as zennit's own explicit relevance divided by the stabilised input.
"""
import pytest
import torch
import torch.nn.functional as F
import zennit.rules
from zennit.composites import LayerMapComposite

import lxt_ext.ops
import lxt_ext.rules
from conftest import assert_rel_close
from lxt_ext.composites import TransformerComposite
from lxt_ext.attention import MultiheadAttentionRule
from lxt_ext.transformer import (ActivationIdentity, DropoutOff, NormIdentity, OutputEpsilon, identity_rule,
                                 layer_norm_identity, linear_rule_apply, rms_norm_identity, uniform_product)
from lxt_ext.core import SwappedForward, rule_of
from lxt_ext.layers import UnsupportedLayerError


def zennit_stab(x, eps):
    return x + eps * (x.sign() + (x == 0).to(x))


def grad_of(fn, *inputs, grad_output):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    return torch.autograd.grad(fn(*leaves), leaves, grad_output)


@pytest.mark.parametrize('fn', [torch.nn.GELU(), torch.nn.GELU(approximate='tanh'), torch.nn.SiLU(), torch.nn.Tanh(),
                                torch.nn.Sigmoid(), torch.nn.ReLU(), torch.nn.ReLU(inplace=True)],
                         ids=['gelu', 'gelu_tanh', 'silu', 'tanh', 'sigmoid', 'relu', 'relu_inplace'])
def test_activation_identity_rule(fn, generator):
    x = torch.randn(4, 7, 9, dtype=torch.float64, generator=generator)
    x[0, 0, :3] = 0.
    g = torch.randn(x.shape, dtype=torch.float64, generator=generator)
    expected = g * fn(x.clone()) / zennit_stab(x, 1e-10)
    composite = LayerMapComposite([(type(fn), ActivationIdentity())])
    with composite.context(fn) as module:
        (actual,) = grad_of(module, x, grad_output=g)
    assert_rel_close(actual, expected, 1e-12)
    # LXT's form, output / (input + eps), where the two stabilisers agree (x >= 0)
    lxt = g * fn(x.clone()) / (x + 1e-10)
    positive = x >= 0
    torch.testing.assert_close(actual[positive], lxt[positive])
    (functional,) = grad_of(lambda t: identity_rule(fn, t), x, grad_output=g)
    assert_rel_close(functional, expected, 1e-12)


@pytest.mark.parametrize('dtype', [torch.float64, torch.bfloat16])
def test_rules_without_kernels_for_the_device(dtype, generator, monkeypatch):
    """Where the build has no kernels for a device (CUDA in a CPU-only build), the identity rule and
    OutputEpsilon compute the same formulas in tensor ops."""
    monkeypatch.setattr(lxt_ext.ops, 'has_kernels', lambda tensor: False)
    x = torch.randn(4, 7, 9, dtype=torch.float64, generator=generator)
    x[0, 0, :3] = 0.
    g = torch.randn(x.shape, dtype=torch.float64, generator=generator)
    fn = torch.nn.GELU()
    (actual,) = grad_of(lambda t: identity_rule(fn, t), x.to(dtype), grad_output=g.to(dtype))
    expected = g * fn(x) / zennit_stab(x, 1e-10)
    assert actual.dtype == dtype
    torch.testing.assert_close(actual.double(), expected, **({} if dtype == torch.float64 else dict(rtol=2e-2, atol=1e-2)))
    layer = torch.nn.Linear(9, 6).to(dtype)
    w, b = layer.weight.detach().double(), layer.bias.detach().double()
    h = torch.randn(4, 7, 6, dtype=torch.float64, generator=generator)
    with LayerMapComposite([(torch.nn.Linear, OutputEpsilon(1e-6))]).context(layer) as modified:
        (actual,) = grad_of(modified, x.to(dtype), grad_output=h.to(dtype))
    (expected,) = grad_of(lambda t: epsilon_linear_reference(t, w, b), x, grad_output=h)
    torch.testing.assert_close(actual.double(), expected, **({} if dtype == torch.float64 else dict(rtol=2e-2, atol=2e-2)))


def test_activation_identity_rejects_non_elementwise():
    x = torch.randn(3, 4, requires_grad=True)
    with pytest.raises(TypeError, match='element-wise'):
        identity_rule(lambda t: t.sum(-1), x)


def _layer_norm_detached(x, shape, weight, bias, eps):
    dims = tuple(range(-len(shape), 0))
    mean = x.mean(dims, keepdim=True)
    rstd = torch.rsqrt(x.var(dims, unbiased=False, keepdim=True) + eps)
    return (x - mean) * rstd.detach() * weight + bias


@pytest.mark.parametrize('shape', [(16,), (4, 8)])
def test_layer_norm_identity(shape, generator):
    x = torch.randn(3, 5, *shape, generator=generator) * 3 + 1
    w, b = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    g = torch.randn(x.shape, generator=generator)
    (expected,) = grad_of(lambda t: _layer_norm_detached(t, shape, w, b, 1e-5), x, grad_output=g)
    (actual,) = grad_of(lambda t: layer_norm_identity(t, shape, w, b, 1e-5), x, grad_output=g)
    assert_rel_close(actual, expected, 1e-5)
    torch.testing.assert_close(layer_norm_identity(x, shape, w, b, 1e-5), F.layer_norm(x, shape, w, b, 1e-5),
                               rtol=0, atol=0)
    module = torch.nn.LayerNorm(shape)
    with torch.no_grad():
        module.weight.copy_(w), module.bias.copy_(b)
    with LayerMapComposite([(torch.nn.LayerNorm, NormIdentity())]).context(module) as modified:
        (via_module,) = grad_of(modified, x, grad_output=g)
    assert_rel_close(via_module, expected, 1e-5)


def test_layer_norm_identity_bfloat16(generator):
    x = torch.randn(6, 32, generator=generator) * 4
    w, b = torch.randn(32, generator=generator), torch.randn(32, generator=generator)
    g = torch.randn(x.shape, generator=generator)
    (expected,) = grad_of(lambda t: _layer_norm_detached(t, (32,), w, b, 1e-5), x, grad_output=g)
    (actual,) = grad_of(lambda t: layer_norm_identity(t, (32,), w.bfloat16(), b.bfloat16(), 1e-5),
                        x.bfloat16(), grad_output=g.bfloat16())
    assert actual.dtype == torch.bfloat16
    assert_rel_close(actual.float(), expected, 2e-2)


@pytest.mark.parametrize('offset', [0., 1.])
def test_rms_norm_identity(offset, generator):
    x = torch.randn(3, 5, 16, dtype=torch.float64, generator=generator) * 2
    w = torch.randn(16, dtype=torch.float64, generator=generator)
    g = torch.randn(x.shape, dtype=torch.float64, generator=generator)

    def reference(t):
        return (offset + w) * t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6).detach()

    (expected,) = grad_of(reference, x, grad_output=g)
    (actual,) = grad_of(lambda t: rms_norm_identity(t, w, 1e-6, weight_offset=offset), x, grad_output=g)
    torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=1e-6)  # statistics in float32
    torch.testing.assert_close(rms_norm_identity(x, w, 1e-6, offset).double(), reference(x), rtol=1e-5, atol=1e-6)


def test_rms_norm_module(generator):
    module = torch.nn.RMSNorm((4, 8), eps=1e-6)
    with torch.no_grad():
        module.weight.normal_(generator=generator)
    x = torch.randn(3, 4, 8, generator=generator)
    g = torch.randn(x.shape, generator=generator)
    (expected,) = grad_of(lambda t: module.weight * t * torch.rsqrt(t.pow(2).mean((-2, -1), keepdim=True) + 1e-6)
                          .detach(), x, grad_output=g)
    with LayerMapComposite([(torch.nn.RMSNorm, NormIdentity())]).context(module) as modified:
        (actual,) = grad_of(modified, x, grad_output=g)
    assert_rel_close(actual, expected, 1e-5)


def test_norm_identity_refuses_unknown_subclass():
    class ChannelsFirstLayerNorm(torch.nn.LayerNorm):
        def forward(self, x):
            return super().forward(x.transpose(1, -1)).transpose(1, -1)

    with pytest.raises(UnsupportedLayerError, match='ChannelsFirstLayerNorm'):
        LayerMapComposite([(torch.nn.LayerNorm, NormIdentity())]).register(ChannelsFirstLayerNorm(4))


def test_uniform_product_with_broadcasting(generator):
    a = torch.randn(4, 1, 6, dtype=torch.float64, generator=generator)
    b = torch.randn(3, 6, dtype=torch.float64, generator=generator)
    g = torch.randn(4, 3, 6, dtype=torch.float64, generator=generator)
    grad_a, grad_b = grad_of(uniform_product, a, b, grad_output=g)
    torch.testing.assert_close(grad_a, (g * b / 2).sum(1, keepdim=True))
    torch.testing.assert_close(grad_b, (g * a / 2).sum(0))
    torch.testing.assert_close(uniform_product(a, b), a * b)


def test_dropout_off_in_train_mode_and_restored():
    dropout = torch.nn.Dropout(0.5).train()
    x = torch.ones(1000)
    composite = LayerMapComposite([(torch.nn.Dropout, DropoutOff())])
    with composite.context(dropout) as modified:
        assert torch.equal(modified(x), x)
        with torch.no_grad():
            assert torch.equal(modified(x), x)
    assert (dropout(x) == 0).any()


def epsilon_linear_reference(x, weight, bias, eps=1e-6):
    """Linear forward; backward ``W^T (g * y / stab(y))`` (epsilon in Gradient x Input)."""
    y = F.linear(x, weight, bias)
    ratio = (y / zennit_stab(y, eps)).detach()
    product = F.linear(x, weight)
    return product * ratio + (y - product * ratio).detach()


@pytest.mark.parametrize('rule', [lxt_ext.rules.Epsilon(1e-6), zennit.rules.Epsilon(1e-6), OutputEpsilon(1e-6)],
                         ids=['lxt_ext', 'zennit', 'output_epsilon'])
def test_linear_rule_apply_epsilon(rule, generator):
    x = torch.randn(5, 7, 12, generator=generator)
    w, b = torch.randn(10, 12, generator=generator), torch.randn(10, generator=generator)
    g = torch.randn(5, 7, 10, generator=generator)
    (expected,) = grad_of(lambda t: epsilon_linear_reference(t, w, b), x, grad_output=g)
    (actual,) = grad_of(lambda t: linear_rule_apply(rule, t, w, b), x, grad_output=g)
    assert_rel_close(actual, expected, 1e-5)
    (plain,) = grad_of(lambda t: linear_rule_apply(None, t, w, b), x, grad_output=g)
    torch.testing.assert_close(plain, g @ w)


def test_output_epsilon_module(generator):
    layer = torch.nn.Linear(12, 10)
    x = torch.randn(5, 12, generator=generator)
    g = torch.randn(5, 10, generator=generator)
    (expected,) = grad_of(lambda t: epsilon_linear_reference(t, layer.weight.detach(), layer.bias.detach()), x,
                          grad_output=g)
    with LayerMapComposite([(torch.nn.Linear, OutputEpsilon(1e-6))]).context(layer) as modified:
        (actual,) = grad_of(modified, x, grad_output=g)
    assert_rel_close(actual, expected, 1e-5)


@pytest.mark.parametrize('epsilon', [0.0, 1e-3])
def test_language_transformer_linear_rule(epsilon, generator):
    """epsilon 0: Linear layers keep their plain gradient (no rule is registered), which is the
    epsilon formula's limit ``W^T g``; epsilon > 0: the epsilon formula. The layer is the model here: its output
    takes relevance ``R = y * g`` (zennit's convention) and passes ``g`` on."""
    from lxt_ext.composites import LanguageTransformer
    layer = torch.nn.Linear(12, 10)
    x = torch.randn(5, 12, generator=generator)
    g = torch.randn(5, 10, generator=generator)
    w, b = layer.weight.detach(), layer.bias.detach()
    with LanguageTransformer(epsilon=epsilon).context(layer) as modified:
        assert isinstance(rule_of(layer), SwappedForward) == (epsilon > 0)  # epsilon 0: KeepGradient, no swap
        (actual,) = grad_of(modified, x, grad_output=g * layer(x).detach())
    expected = g @ w if epsilon == 0 else grad_of(lambda t: epsilon_linear_reference(t, w, b, epsilon), x,
                                                   grad_output=g)[0]
    assert_rel_close(actual, expected, 1e-5)
    with pytest.raises(ValueError, match='epsilon must be >= 0'):
        LanguageTransformer(epsilon=-1e-6)


@pytest.mark.parametrize('library, name, kwargs, explicit', [
    (zennit.rules, 'Gamma', dict(gamma=0.25), False), (zennit.rules, 'ZPlus', {}, False),
    (zennit.rules, 'Flat', {}, True), (zennit.rules, 'WSquare', {}, True),
    (zennit.rules, 'ZBox', dict(low=-3., high=3.), True),
    (lxt_ext.rules, 'ZBox', dict(low=-3., high=3.), True), (lxt_ext.rules, 'ZBox', dict(low=-3., high=3.), False),
    (lxt_ext.rules, 'Flat', {}, True),
], ids=['zennit_gamma', 'zennit_zplus', 'zennit_flat', 'zennit_wsquare', 'zennit_zbox', 'lxt_ext_zbox_first',
        'lxt_ext_zbox_inner', 'lxt_ext_flat'])
def test_explicit_rules_adapted_per_hook(library, name, kwargs, explicit, generator):
    """zennit's rules, and lxt_ext's explicit-only ones, in a transformer composite vs zennit's own
    explicit relevance for ``R_out = y * g``: ``R_in / stab(x)`` inside, ``R_in`` itself on the first
    layer."""
    torch.manual_seed(0)
    layer = torch.nn.Conv2d(3, 6, 3, padding=1) if explicit else torch.nn.Linear(12, 8)
    x = torch.randn(2, 3, 8, 8, generator=generator) if explicit else torch.randn(4, 12, generator=generator)
    g = torch.randn(layer(x).shape, generator=generator)
    y = layer(x).detach()
    with LayerMapComposite([(type(layer), getattr(zennit.rules, name)(**kwargs))]).context(layer) as modified:
        (reference,) = grad_of(modified, x, grad_output=g * y)
    composite = TransformerComposite(getattr(library, name)(**kwargs), explicit_first=explicit)
    with composite.context(layer) as modified:  # the layer is the model: its output takes relevance y * g
        (actual,) = grad_of(modified, x, grad_output=g * y)
    assert_rel_close(actual, reference if explicit else reference / zennit_stab(x, 1e-10), 1e-5)


# --- nn.MultiheadAttention ---------------------------------------------------------------------

def _mha(batch_first, kdim=None, bias=True, seed=0):
    torch.manual_seed(seed)
    module = torch.nn.MultiheadAttention(16, 4, batch_first=batch_first, kdim=kdim, vdim=kdim, bias=bias).eval()
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.5)
    return module


def dense_mha(module, query, key, value, mode, linear, mask=None):
    """nn.MultiheadAttention written out (batch-first inputs): projections by ``linear``, attention
    with AttnLRP (gradients of q, k, v times 1/4, 1/4, 1/2) or CP-LRP (q, k detached)."""
    E, H = module.embed_dim, module.num_heads
    if module._qkv_same_embed_dim:
        wq, wk, wv = module.in_proj_weight.chunk(3)
    else:
        wq, wk, wv = module.q_proj_weight, module.k_proj_weight, module.v_proj_weight
    bq, bk, bv = module.in_proj_bias.chunk(3) if module.in_proj_bias is not None else (None,) * 3
    q, k, v = (linear(t, w, b).unflatten(-1, (H, E // H)).transpose(1, 2)
               for t, w, b in ((query, wq, bq), (key, wk, bk), (value, wv, bv)))
    if mode == 'cp':
        q, k = q.detach(), k.detach()
    else:
        for t, factor in ((q, 4), (k, 4), (v, 2)):
            t.register_hook(lambda grad, factor=factor: grad / factor)
    scores = q @ k.transpose(-2, -1) / (E // H) ** 0.5
    if mask is not None:
        scores = scores + mask
    out = (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)
    return linear(out, module.out_proj.weight, module.out_proj.bias)


@pytest.mark.parametrize('batch_first', [True, False])
@pytest.mark.parametrize('inputs', ['self', 'separate', 'kv_dim'])
@pytest.mark.parametrize('mode', ['attnlrp', 'cp'])
def test_multihead_attention_rule(batch_first, inputs, mode, generator):
    module = _mha(batch_first, kdim=12 if inputs == 'kv_dim' else None)
    query = torch.randn(3, 5, 16, generator=generator)
    key = query if inputs == 'self' else torch.randn(3, 7, module.kdim, generator=generator)
    value = key if inputs == 'self' else torch.randn(3, 7, module.vdim, generator=generator)
    g = torch.randn(3, 5, 16, generator=generator)
    padding = torch.zeros(3, key.shape[1], dtype=torch.bool)
    padding[1, -2:] = True
    mask = torch.zeros(3, 1, 1, key.shape[1]).masked_fill(padding[:, None, None], float('-inf'))

    def seq(t):
        return t if batch_first else t.transpose(0, 1)

    for rule, linear in ((None, F.linear), (lxt_ext.rules.Epsilon(1e-6), epsilon_linear_reference)):
        leaves = [t.detach().clone().requires_grad_() for t in (query, key, value)]
        expected_out = dense_mha(module, *([leaves[0]] * 3 if inputs == 'self' else leaves), mode, linear, mask)
        expected = torch.autograd.grad(expected_out, leaves if inputs != 'self' else leaves[:1], g,
                                       materialize_grads=True)
        composite = LayerMapComposite([(torch.nn.MultiheadAttention, MultiheadAttentionRule(mode, rule))])
        with composite.context(module) as modified:
            leaves = [t.detach().clone().requires_grad_() for t in (query, key, value)]
            args = [seq(leaves[0])] * 3 if inputs == 'self' else [seq(t) for t in leaves]
            out, weights = modified(*args, key_padding_mask=padding)
            actual = torch.autograd.grad(seq(out), leaves if inputs != 'self' else leaves[:1], g,
                                         materialize_grads=True)
        plain_out, plain_weights = module(*[seq(t) for t in (query, key, value)], key_padding_mask=padding)
        torch.testing.assert_close(out, plain_out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(weights, plain_weights, rtol=1e-5, atol=1e-6)
        for a, e in zip(actual, expected):
            if e.abs().max() == 0:  # CP-LRP: no relevance to separate query and key inputs
                assert a.abs().max() == 0
            else:
                assert_rel_close(a, e, 1e-5)


@pytest.mark.parametrize('mode', ['attnlrp', 'cp'])
def test_multihead_attention_masks_and_unbatched(mode, generator):
    """Unbatched (L, E) self-attention with a boolean causal, a float and an is_causal mask: the forward
    and attention weights are nn.MultiheadAttention's, the relevance (gradient) is ``dense_mha``'s with
    the same mask written out additively, with the plain and the epsilon projections."""
    module = _mha(batch_first=False)
    x = torch.randn(6, 16, generator=generator)  # unbatched (L, E)
    g = torch.randn(6, 16, generator=generator)
    causal = torch.triu(torch.ones(6, 6, dtype=torch.bool), 1)
    causal_additive = torch.zeros(6, 6).masked_fill(causal, float('-inf'))
    float_mask = torch.randn(6, 6, generator=generator)
    cases = ((dict(attn_mask=causal), causal_additive),
             (dict(attn_mask=float_mask, average_attn_weights=False), float_mask),
             (dict(attn_mask=causal, is_causal=True, need_weights=False), causal_additive))
    for rule, linear in ((None, F.linear), (lxt_ext.rules.Epsilon(1e-6), epsilon_linear_reference)):
        composite = LayerMapComposite([(torch.nn.MultiheadAttention, MultiheadAttentionRule(mode, rule))])
        for kwargs, additive in cases:
            leaf = x.clone().requires_grad_()
            (expected,) = torch.autograd.grad(dense_mha(module, *[leaf[None]] * 3, mode, linear, additive)[0],
                                              leaf, g)
            with composite.context(module) as modified:
                xg = x.clone().requires_grad_()
                out, weights = modified(xg, xg, xg, **kwargs)
                (actual,) = torch.autograd.grad(out, xg, g)
            plain, plain_weights = module(x, x, x, **kwargs)
            torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-5)
            if plain_weights is None:
                assert weights is None
            else:
                torch.testing.assert_close(weights, plain_weights, rtol=1e-5, atol=1e-6)
            assert_rel_close(actual, expected, 1e-5)


def test_multihead_attention_unsupported_is_refused():
    module = torch.nn.MultiheadAttention(8, 2, add_bias_kv=True)
    with pytest.raises(NotImplementedError, match='add_bias_kv'):
        LayerMapComposite([(torch.nn.MultiheadAttention, MultiheadAttentionRule())]).register(module)
