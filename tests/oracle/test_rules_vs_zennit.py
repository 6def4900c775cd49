"""lxt_ext's fused rules against zennit's rules of the same name (the oracle), layer by layer.

Relevance is ``torch.autograd.grad(y, x, grad_outputs=r)`` with the rule placed by a zennit composite;
every layer zennit types as Linear is covered, with random nonzero biases (zero biases would hide the
bias handling), inputs with negative values and exact zeros, and post-ReLU inputs.
"""
import copy
import inspect

import pytest
import torch
from torch import nn
from zennit.attribution import Gradient
from zennit.composites import (
    LayerMapComposite, MixedComposite, NameMapComposite, SpecialFirstLayerMapComposite,
)
from zennit.core import Stabilizer

import lxt_ext.rules
import zennit.layer
import zennit.rules
from conftest import (
    RULE_NAMES, assert_rel_close, layer_relevance, randomize_biases, relevance, relu_input, rule_pair,
    signed_input,
)

RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}

# (id, rule name, kwargs): parameter variety, including zero_params and non-default stabilizers.
RULES = [
    ('eps1e-6', 'Epsilon', {'epsilon': 1e-6}),
    ('eps0.1', 'Epsilon', {'epsilon': 0.1}),
    ('eps_zero_bias', 'Epsilon', {'epsilon': 1e-6, 'zero_params': 'bias'}),
    ('gamma0', 'Gamma', {'gamma': 0.}),
    ('gamma0.25', 'Gamma', {'gamma': 0.25}),
    ('gamma1', 'Gamma', {'gamma': 1.0}),
    ('gamma_stab0.1', 'Gamma', {'gamma': 0.25, 'stabilizer': 0.1}),
    ('gamma_zero_bias', 'Gamma', {'gamma': 0.25, 'zero_params': 'bias'}),
    ('zplus', 'ZPlus', {}),
    ('zplus_zero_bias', 'ZPlus', {'zero_params': ['bias']}),
    ('ab1-0', 'AlphaBeta', {'alpha': 1, 'beta': 0}),
    ('ab2-1', 'AlphaBeta', {'alpha': 2, 'beta': 1}),
    ('ab3-2', 'AlphaBeta', {'alpha': 3, 'beta': 2}),
    ('ab2-1_stab0.1', 'AlphaBeta', {'alpha': 2., 'beta': 1., 'stabilizer': 0.1}),
    ('ab_zero_bias', 'AlphaBeta', {'alpha': 2, 'beta': 1, 'zero_params': 'bias'}),
]

# (id, module factory, input shape, forward kwargs)
LAYERS = [
    ('linear', lambda: nn.Linear(7, 5), (4, 7), {}),
    ('linear_nobias', lambda: nn.Linear(7, 5, bias=False), (4, 7), {}),
    ('linear_3d_input', lambda: nn.Linear(6, 4), (2, 3, 6), {}),
    ('linear_unbatched', lambda: nn.Linear(6, 4), (6,), {}),
    ('conv1d', lambda: nn.Conv1d(4, 6, 3), (2, 4, 11), {}),
    ('conv1d_s2_p1_d2', lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1, dilation=2), (2, 4, 13), {}),
    ('conv1d_same_d2', lambda: nn.Conv1d(4, 6, 3, padding='same', dilation=2), (2, 4, 10), {}),
    ('conv1d_valid_nobias', lambda: nn.Conv1d(4, 5, 4, padding='valid', bias=False), (2, 4, 9), {}),
    ('conv1d_groups2', lambda: nn.Conv1d(4, 6, 3, groups=2, padding=2), (2, 4, 8), {}),
    ('conv1d_unbatched', lambda: nn.Conv1d(3, 4, 3, stride=2), (3, 9), {}),
    ('conv2d', lambda: nn.Conv2d(3, 5, 3, padding=1), (2, 3, 7, 7), {}),
    ('conv2d_s2_p_d_nobias', lambda: nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(2, 1), dilation=(2, 1),
                                                bias=False), (2, 3, 9, 8), {}),
    ('conv2d_same', lambda: nn.Conv2d(4, 4, 5, padding='same'), (2, 4, 6, 6), {}),
    ('conv2d_valid', lambda: nn.Conv2d(3, 4, 3, padding='valid', stride=(1, 2)), (2, 3, 6, 7), {}),
    ('conv2d_groups3_s2', lambda: nn.Conv2d(6, 9, 3, groups=3, stride=2, padding=1), (2, 6, 7, 7), {}),
    ('conv2d_depthwise', lambda: nn.Conv2d(4, 8, 3, groups=4), (2, 4, 6, 6), {}),
    ('conv2d_1x1', lambda: nn.Conv2d(5, 3, 1), (2, 5, 4, 4), {}),
    ('conv2d_unbatched', lambda: nn.Conv2d(3, 4, 3, padding=1), (3, 6, 6), {}),
    ('conv3d', lambda: nn.Conv3d(2, 3, 3, padding=1), (2, 2, 4, 5, 4), {}),
    ('conv3d_s2_groups_d', lambda: nn.Conv3d(4, 4, (3, 2, 3), stride=2, padding=(1, 0, 1), dilation=(1, 2, 1),
                                              groups=2), (2, 4, 6, 6, 6), {}),
    ('conv3d_same_nobias', lambda: nn.Conv3d(2, 3, 3, padding='same', bias=False), (2, 2, 4, 4, 4), {}),
    ('conv3d_unbatched', lambda: nn.Conv3d(2, 3, 2), (2, 4, 4, 4), {}),
    ('convT1d_s2_p1_op1', lambda: nn.ConvTranspose1d(4, 3, 3, stride=2, padding=1, output_padding=1),
     (2, 4, 6), {}),
    ('convT1d_groups_d2', lambda: nn.ConvTranspose1d(4, 6, 3, dilation=2, groups=2), (2, 4, 5), {}),
    ('convT1d_output_size', lambda: nn.ConvTranspose1d(3, 2, 4, stride=3, padding=1), (2, 3, 5),
     {'output_size': [15]}),
    ('convT1d_unbatched', lambda: nn.ConvTranspose1d(3, 2, 3, stride=2), (3, 5), {}),
    ('convT2d_s2_p1', lambda: nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1), (2, 3, 4, 4), {}),
    ('convT2d_op_groups_nobias', lambda: nn.ConvTranspose2d(4, 6, (3, 4), stride=(2, 3), padding=(1, 2),
                                                            output_padding=(1, 2), groups=2, bias=False),
     (2, 4, 4, 3), {}),
    ('convT2d_d2_op1', lambda: nn.ConvTranspose2d(3, 2, 3, stride=2, dilation=2, output_padding=1),
     (2, 3, 4, 4), {}),
    ('convT2d_output_size', lambda: nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1), (2, 3, 5, 5),
     {'output_size': (10, 10)}),
    ('convT2d_unbatched', lambda: nn.ConvTranspose2d(3, 2, 2, stride=2), (3, 3, 4), {}),
    ('convT3d_s2_op1', lambda: nn.ConvTranspose3d(2, 3, 3, stride=2, padding=1, output_padding=1),
     (2, 2, 3, 3, 3), {}),
    ('convT3d_groups_d', lambda: nn.ConvTranspose3d(4, 2, (2, 3, 3), stride=(1, 2, 2), dilation=(2, 1, 1),
                                                    groups=2), (2, 4, 3, 3, 3), {}),
    ('convT3d_output_size', lambda: nn.ConvTranspose3d(2, 2, 3, stride=2), (1, 2, 3, 2, 3),
     {'output_size': (8, 5, 7)}),
]

LAYERS_BY_ID = {case[0]: case for case in LAYERS}


def make_layer(factory, dtype, generator):
    torch.manual_seed(int(torch.randint(2 ** 31, (1,), generator=generator)))
    module = factory().to(dtype)
    return randomize_biases(module, generator, std=0.5)


def oracle_layer(module, x, forward_kwargs):
    """The module zennit evaluates. zennit 0.5 re-runs ``module.forward(input)`` without the forward's
    keyword arguments, so a transposed convolution called with ``output_size=`` is given to zennit as
    the equivalent module with ``output_padding`` set (the same function of the input)."""
    if 'output_size' not in forward_kwargs:
        return module, forward_kwargs
    with torch.no_grad():
        target = module(x, **forward_kwargs).shape[2:]
        plain = module(x).shape[2:]
    equivalent = copy.deepcopy(module)
    equivalent.output_padding = tuple(t - p for t, p in zip(target, plain))
    assert any(equivalent.output_padding), 'test case does not exercise output_size'
    return equivalent, {}


def draw(layer_id, dtype, input_kind, generator):
    _, factory, shape, forward_kwargs = LAYERS_BY_ID[layer_id]
    module = make_layer(factory, dtype, generator)
    x = (signed_input if input_kind == 'signed' else relu_input)(shape, dtype, generator)
    with torch.no_grad():
        y = module(x, **forward_kwargs)
    r = torch.randn(y.shape, dtype=dtype, generator=generator)
    return module, x, r, forward_kwargs


def _product(module, weight, bias, x, forward_kwargs):
    params = {'weight': weight}
    if module.bias is not None:
        params['bias'] = bias
    return torch.func.functional_call(module, params, (x,), forward_kwargs)


def well_conditioned_relevance(module, x, r, name, rule_kwargs, forward_kwargs, threshold=0.05):
    """``r`` with zeros at the outputs where one of zennit's rule denominators nearly cancels
    (``|z| < threshold * (|W||x| + |b|)``, computed in float64 from zennit's formulas). There the
    relevance is ``r / z`` with ``z`` a cancelling sum, so float32 rounding is amplified in *any*
    implementation (zennit's own float32 error reaches 1e-4 of max|R| on such draws); 1e-5
    agreement in float32 is only meaningful on well-conditioned outputs. float64 tests keep all."""
    if name in ('ZPlus', 'AlphaBeta'):
        return r  # their denominators are sums of one sign: well-conditioned
    module = copy.deepcopy(module).double()
    x = x.double()
    w = module.weight.detach()
    b = module.bias.detach() if module.bias is not None else torch.zeros(w.shape[0])
    if rule_kwargs.get('zero_params') is not None:
        b = torch.zeros_like(b)
    wp, wn, xp, xn = w.clamp(min=0), w.clamp(max=0), x.clamp(min=0), x.clamp(max=0)
    with torch.no_grad():
        scale = _product(module, w.abs(), b.abs(), x.abs(), forward_kwargs)
        if name == 'Epsilon':
            denominators = [_product(module, w, b, x, forward_kwargs)]
        else:
            g = rule_kwargs.get('gamma', 0.25)
            zero_b = torch.zeros_like(b)
            denominators = [
                _product(module, w + g * wp, b + g * b.clamp(min=0), xp, forward_kwargs)
                + _product(module, w + g * wn, zero_b, xn, forward_kwargs),
                _product(module, w + g * wn, b + g * b.clamp(max=0), xp, forward_kwargs)
                + _product(module, w + g * wp, zero_b, xn, forward_kwargs),
            ]
    ill = torch.zeros(r.shape, dtype=torch.bool)
    for z in denominators:
        ill |= z.abs() < threshold * scale
    assert (~ill).float().mean() > 0.3, 'too few well-conditioned outputs to test'
    return r.masked_fill(ill, 0.)


def compare(layer_id, rule_kwargs, name, dtype, input_kind, generator):
    module, x, r, forward_kwargs = draw(layer_id, dtype, input_kind, generator)
    if dtype == torch.float32:
        r = well_conditioned_relevance(module, x, r, name, rule_kwargs, forward_kwargs)
    reference_module, reference_kwargs = oracle_layer(module, x, forward_kwargs)
    expected = layer_relevance(reference_module, x, r, getattr(zennit.rules, name)(**rule_kwargs), reference_kwargs)
    actual = layer_relevance(module, x, r, getattr(lxt_ext.rules, name)(**rule_kwargs), forward_kwargs)
    assert_rel_close(actual, expected, RTOL[dtype])


@pytest.mark.parametrize('input_kind', ['signed', 'relu'])
@pytest.mark.parametrize('layer_id', [case[0] for case in LAYERS])
@pytest.mark.parametrize('rule_id,name,rule_kwargs', RULES, ids=[rule[0] for rule in RULES])
def test_rule_matches_zennit_float64(rule_id, name, rule_kwargs, layer_id, input_kind, generator):
    compare(layer_id, rule_kwargs, name, torch.float64, input_kind, generator)


FLOAT32_LAYERS = ['linear_3d_input', 'conv1d_groups2', 'conv2d_groups3_s2', 'conv3d', 'convT2d_s2_p1',
                  'convT2d_output_size', 'conv2d_unbatched']


@pytest.mark.parametrize('input_kind', ['signed', 'relu'])
@pytest.mark.parametrize('layer_id', FLOAT32_LAYERS)
@pytest.mark.parametrize('rule_id,name,rule_kwargs', RULES, ids=[rule[0] for rule in RULES])
def test_rule_matches_zennit_float32(rule_id, name, rule_kwargs, layer_id, input_kind, generator):
    compare(layer_id, rule_kwargs, name, torch.float32, input_kind, generator)


@pytest.mark.parametrize('rule_id,name,rule_kwargs', RULES[::2], ids=[rule[0] for rule in RULES[::2]])
def test_rule_matches_zennit_wide_linear(rule_id, name, rule_kwargs, generator):
    """A wider layer (long reductions) in float32 with post-ReLU inputs."""
    module = randomize_biases(nn.Linear(512, 96), generator)
    x = relu_input((8, 512), torch.float32, generator)
    r = torch.randn(8, 96, generator=generator)
    r = well_conditioned_relevance(module, x, r, name, rule_kwargs, {}, threshold=0.02)
    expected = layer_relevance(module, x, r, getattr(zennit.rules, name)(**rule_kwargs))
    assert_rel_close(layer_relevance(module, x, r, getattr(lxt_ext.rules, name)(**rule_kwargs)), expected, 1e-5)


def test_stabilizer_object_matches_zennit(generator):
    """A plain ``zennit.core.Stabilizer`` is accepted wherever zennit accepts one."""
    module = make_layer(LAYERS_BY_ID['conv2d'][1], torch.float64, generator)
    x = signed_input((2, 3, 7, 7), torch.float64, generator)
    r = torch.randn(2, 5, 7, 7, dtype=torch.float64, generator=generator)
    for name, kwargs in [('Epsilon', {'epsilon': Stabilizer(epsilon=0.01)}),
                         ('Gamma', {'stabilizer': Stabilizer(epsilon=0.01)}),
                         ('AlphaBeta', {'stabilizer': Stabilizer(epsilon=0.01)})]:
        ours, theirs = rule_pair(name, **kwargs)
        assert_rel_close(layer_relevance(module, x, r, ours), layer_relevance(module, x, r, theirs), 1e-10)


# ------------------------------------------------------------------------------------------------
# The rules inside zennit's other composite types and attributors, mixed with zennit's own hooks.

def inactive_and_active(composite, model, x, r):
    """Input gradients under ``composite``: first inside ``composite.inactive()``, then active again."""
    xg = x.clone().requires_grad_()
    with composite.context(model) as modified:
        with composite.inactive():
            (inactive,) = torch.autograd.grad(modified(xg), xg, r)
        (active,) = torch.autograd.grad(modified(xg), xg, r)
    return inactive, active


def small_cnn(dtype=torch.float64, seed=1):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(),
        nn.Conv2d(6, 8, 3, stride=2), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 3 * 3, 10),
    ).to(dtype).eval()
    return randomize_biases(model, torch.Generator().manual_seed(seed), std=0.3)


def _special_first(rules):
    return SpecialFirstLayerMapComposite(
        layer_map=[(nn.ReLU, zennit.rules.Pass()),
                   (nn.Conv2d, rules.AlphaBeta(alpha=2, beta=1)), (nn.Linear, rules.Epsilon(epsilon=0.01))],
        first_map=[(nn.Conv2d, rules.Gamma(gamma=0.5))],
    )


def _name_map(rules):
    return NameMapComposite(name_map=[
        (['0'], rules.ZPlus()), (['2'], rules.Gamma(gamma=1.0)), (['5'], rules.Epsilon(epsilon=1e-6)),
    ])


def _mixed(rules):
    return MixedComposite(composites=[
        NameMapComposite(name_map=[(['0'], rules.Gamma(gamma=0.25))]),
        LayerMapComposite(layer_map=[(nn.Conv2d, rules.ZPlus()), (nn.Linear, rules.Epsilon(epsilon=0.1))]),
    ])


@pytest.mark.parametrize('make_composite', [_special_first, _name_map, _mixed], ids=['special_first', 'name_map',
                                                                                      'mixed'])
def test_composite_types_match_zennit(make_composite, generator):
    model = small_cnn()
    x = signed_input((2, 3, 8, 8), torch.float64, generator)
    r = torch.randn(2, 10, dtype=torch.float64, generator=generator)
    expected = relevance(model, x, r, make_composite(zennit.rules))
    actual = relevance(model, x, r, make_composite(lxt_ext.rules))
    assert_rel_close(actual, expected, 1e-10)


def test_gradient_attributor_matches_zennit(generator):
    model = small_cnn(torch.float32)
    x = relu_input((2, 3, 8, 8), torch.float32, generator)
    results = []
    for rules in (zennit.rules, lxt_ext.rules):
        composite = LayerMapComposite(layer_map=[
            (nn.ReLU, zennit.rules.Pass()), (nn.Conv2d, rules.Gamma(gamma=0.25)), (nn.Linear, rules.Epsilon()),
        ])
        with Gradient(model=model, composite=composite) as attributor:
            output, attribution = attributor(x, torch.eye(10)[[3, 7]])
        results.append((output, attribution))
    (out_z, rel_z), (out_l, rel_l) = results
    torch.testing.assert_close(out_l, out_z, rtol=1e-6, atol=1e-6)
    assert_rel_close(rel_l, rel_z, 1e-5)


# ------------------------------------------------------------------------------------------------
# The Gradient x Input convention: x * g_in equals zennit's relevance for incoming relevance y * g.

GXI_RULES = [rule for rule in RULES if 'zero_bias' not in rule[0]] + [RULES[2]]


@pytest.mark.parametrize('input_kind', ['signed', 'relu'])
@pytest.mark.parametrize('layer_id', ['linear', 'linear_3d_input', 'conv2d', 'conv2d_groups3_s2'])
@pytest.mark.parametrize('rule_id,name,rule_kwargs', GXI_RULES, ids=[rule[0] for rule in GXI_RULES])
def test_gradient_x_input_convention(rule_id, name, rule_kwargs, layer_id, input_kind, generator):
    dtype = torch.float64
    _, factory, shape, _ = LAYERS_BY_ID[layer_id]
    module = make_layer(factory, dtype, generator)
    x = (signed_input if input_kind == 'signed' else relu_input)(shape, dtype, generator)
    with torch.no_grad():
        y = module(x)
    g = torch.randn(y.shape, dtype=dtype, generator=generator)
    rule = getattr(lxt_ext.rules, name)(**rule_kwargs, convention='gradient_x_input')
    grad_in = layer_relevance(module, x, g, rule)
    expected = layer_relevance(module, x, y * g, getattr(zennit.rules, name)(**rule_kwargs))
    assert torch.isfinite(grad_in).all()
    assert_rel_close(x * grad_in, expected, 1e-10)


# ------------------------------------------------------------------------------------------------
# composite.inactive() gives the plain gradient.

@pytest.mark.parametrize('name', RULE_NAMES)
def test_inactive_gives_plain_gradient(name, generator):
    model = small_cnn()
    x = signed_input((2, 3, 8, 8), torch.float64, generator)
    r = torch.randn(2, 10, dtype=torch.float64, generator=generator)
    plain = relevance(model, x, r)
    composite = LayerMapComposite(layer_map=[(nn.Conv2d, getattr(lxt_ext.rules, name)()),
                                             (nn.Linear, getattr(lxt_ext.rules, name)())])
    inactive, active = inactive_and_active(composite, model, x, r)
    assert_rel_close(inactive, plain, 1e-12)
    # the hooks are active again after the inactive() block: zennit's relevance, not the gradient
    reference = relevance(model, x, r, LayerMapComposite(layer_map=[
        (nn.Conv2d, getattr(zennit.rules, name)()), (nn.Linear, getattr(zennit.rules, name)())]))
    assert_rel_close(active, reference, 1e-10)
    assert (active - plain).abs().max() > 1e-6 * plain.abs().max()
    # and the model is plain again after the context
    assert_rel_close(relevance(model, x, r), plain, 0.)


# ------------------------------------------------------------------------------------------------
# Arguments: same signatures, defaults and validation as zennit.

@pytest.mark.parametrize('name', RULE_NAMES)
def test_signature_matches_zennit(name):
    ours = inspect.signature(getattr(lxt_ext.rules, name)).parameters
    theirs = inspect.signature(getattr(zennit.rules, name)).parameters
    shared = [(p.name, p.kind, p.default) for p in ours.values() if p.kind != p.KEYWORD_ONLY]
    assert shared == [(p.name, p.kind, p.default) for p in theirs.values()]
    extra = {p.name: p.default for p in ours.values() if p.kind == p.KEYWORD_ONLY}
    assert extra == {'convention': 'explicit'}


@pytest.mark.parametrize('name', RULE_NAMES)
def test_default_arguments_give_zennit_defaults(name, generator):
    module = make_layer(LAYERS_BY_ID['conv2d_groups3_s2'][1], torch.float64, generator)
    x = signed_input((2, 6, 7, 7), torch.float64, generator)
    r = torch.randn(2, 9, 4, 4, dtype=torch.float64, generator=generator)
    expected = layer_relevance(module, x, r, getattr(zennit.rules, name)())
    assert_rel_close(layer_relevance(module, x, r, getattr(lxt_ext.rules, name)()), expected, 1e-10)


BAD_ARGUMENTS = [
    ('AlphaBeta', {'alpha': 1, 'beta': 1}),
    ('AlphaBeta', {'alpha': 3, 'beta': 1}),
    ('AlphaBeta', {'alpha': -1, 'beta': -2}),
    ('AlphaBeta', {'alpha': 0.5, 'beta': -0.5}),
    ('AlphaBeta', {'alpha': 1., 'beta': 0.5}),
    ('Epsilon', {'epsilon': 'abc'}),
    ('Gamma', {'stabilizer': None}),
    ('ZPlus', {'stabilizer': [1e-6]}),
    ('AlphaBeta', {'stabilizer': 'x'}),
]


@pytest.mark.parametrize('name,kwargs', BAD_ARGUMENTS)
def test_argument_validation_matches_zennit(name, kwargs):
    with pytest.raises(Exception) as theirs:
        getattr(zennit.rules, name)(**kwargs)
    with pytest.raises(type(theirs.value)):
        getattr(lxt_ext.rules, name)(**kwargs)


@pytest.mark.parametrize('name,kwargs', [('AlphaBeta', {'alpha': 3, 'beta': 2}), ('AlphaBeta', {'alpha': 1., 'beta': 0}),
                                         ('Gamma', {'gamma': 0}), ('Epsilon', {'epsilon': 0}),
                                         ('ZPlus', {'stabilizer': 1})])
def test_valid_arguments_accepted_like_zennit(name, kwargs):
    getattr(zennit.rules, name)(**kwargs)
    getattr(lxt_ext.rules, name)(**kwargs)


@pytest.mark.parametrize('name', RULE_NAMES)
def test_unknown_convention_rejected(name):
    with pytest.raises(ValueError):
        getattr(lxt_ext.rules, name)(convention='relevance')


# ------------------------------------------------------------------------------------------------
# ZBox and Flat (first layers) and Norm (residual sums, average pooling): lxt_ext's
# rules keep only the input and compute the products without a graph; zennit's re-run the module.

def _bounds(kind, x, unbatched, generator):
    """``(low, high)`` as zennit takes them: numbers, or tensors broadcast from the left (leading
    dims), or with a larger batch that zennit cuts to the input's."""
    if kind == 'scalar':
        return -2.5, 3.
    shape = {'leading': x.shape[:1] if unbatched else x.shape[:2],
             'full': x.shape,
             'larger_batch': (x.shape[0] + 2,) + x.shape[1:]}[kind]
    low = -(torch.rand(shape, dtype=x.dtype, generator=generator) + 0.5)
    return low, torch.rand(shape, dtype=x.dtype, generator=generator) + 0.5


ZBOX_CASES = [(layer_id, kind) for layer_id in LAYERS_BY_ID for kind in ('scalar', 'leading', 'full', 'larger_batch')
              if not (kind == 'larger_batch' and layer_id.endswith('unbatched'))]


@pytest.mark.parametrize('layer_id,kind', ZBOX_CASES)
def test_zbox_matches_zennit_float64(layer_id, kind, generator):
    module, x, r, forward_kwargs = draw(layer_id, torch.float64, 'signed', generator)
    low, high = _bounds(kind, x, layer_id.endswith('unbatched'), generator)
    reference_module, reference_kwargs = oracle_layer(module, x, forward_kwargs)
    expected = layer_relevance(reference_module, x, r, zennit.rules.ZBox(low, high), reference_kwargs)
    actual = layer_relevance(module, x, r, lxt_ext.rules.ZBox(low, high), forward_kwargs)
    assert_rel_close(actual, expected, 1e-10)


@pytest.mark.parametrize('kwargs', [{'stabilizer': 0.1}, {'zero_params': 'bias'}, {'zero_params': ['bias']},
                                    {'stabilizer': Stabilizer(epsilon=0.01, clip=True)}])
@pytest.mark.parametrize('layer_id', ['linear', 'conv2d_groups3_s2', 'convT2d_s2_p1'])
def test_zbox_arguments_match_zennit(layer_id, kwargs, generator):
    module, x, r, _ = draw(layer_id, torch.float64, 'signed', generator)
    low, high = _bounds('leading', x, False, generator)
    expected = layer_relevance(module, x, r, zennit.rules.ZBox(low, high, **kwargs))
    assert_rel_close(layer_relevance(module, x, r, lxt_ext.rules.ZBox(low, high, **kwargs)), expected, 1e-10)


def test_zbox_float32_matches_zennit(generator):
    module, x, r, _ = draw('conv2d', torch.float32, 'signed', generator)
    expected = layer_relevance(module, x, r, zennit.rules.ZBox(-3., 3.))
    assert_rel_close(layer_relevance(module, x, r, lxt_ext.rules.ZBox(-3., 3.)), expected, 1e-5)


@pytest.mark.parametrize('kwargs', [{}, {'stabilizer': 0.1}, {'zero_params': 'bias'},
                                    {'stabilizer': Stabilizer(epsilon=0.01, clip=True)}], ids=['default', 'stab0.1',
                                                                                               'zero_bias', 'clip'])
@pytest.mark.parametrize('layer_id', list(LAYERS_BY_ID))
def test_flat_matches_zennit_float64(layer_id, kwargs, generator):
    module, x, r, forward_kwargs = draw(layer_id, torch.float64, 'signed', generator)
    reference_module, reference_kwargs = oracle_layer(module, x, forward_kwargs)
    expected = layer_relevance(reference_module, x, r, zennit.rules.Flat(**kwargs), reference_kwargs)
    actual = layer_relevance(module, x, r, lxt_ext.rules.Flat(**kwargs), forward_kwargs)
    assert_rel_close(actual, expected, 1e-10)


NORM_CASES = [
    ('sum_last', lambda: zennit.layer.Sum(), (2, 4, 5, 2)),
    ('sum_dim1_of3', lambda: zennit.layer.Sum(dim=1), (3, 3, 5)),
    ('avgpool2d', lambda: nn.AvgPool2d(2), (2, 3, 6, 6)),
    ('avgpool1d_s2_p1', lambda: nn.AvgPool1d(3, stride=2, padding=1), (2, 3, 9)),
    ('adaptive_avgpool2d', lambda: nn.AdaptiveAvgPool2d((2, 3)), (2, 3, 7, 8)),
]


@pytest.mark.parametrize('stabilizer', [1e-6, 0.1, Stabilizer(epsilon=0.01, clip=True)], ids=['1e-6', '0.1', 'clip'])
@pytest.mark.parametrize('case_id,factory,shape', NORM_CASES, ids=[case[0] for case in NORM_CASES])
def test_norm_matches_zennit_float64(case_id, factory, shape, stabilizer, generator):
    module = factory()
    x = signed_input(shape, torch.float64, generator)
    with torch.no_grad():
        r = torch.randn(module(x).shape, dtype=torch.float64, generator=generator)
    expected = layer_relevance(module, x, r, zennit.rules.Norm(stabilizer=stabilizer))
    assert_rel_close(layer_relevance(module, x, r, lxt_ext.rules.Norm(stabilizer=stabilizer)), expected, 1e-10)


class _Residual(nn.Module):
    """zennit's canonized residual: ``Sum(stack([x, conv(x)]))``; the conv's rule keeps ``x``."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.sum = zennit.layer.Sum()
        self.out = nn.Conv2d(4, 2, 3)

    def forward(self, x):
        return self.out(self.relu(self.sum(torch.stack([x, self.conv(x)], dim=-1))))


def _residual_composite(rules):
    return LayerMapComposite(layer_map=[(nn.ReLU, zennit.rules.Pass()), (zennit.layer.Sum, rules.Norm()),
                                        (nn.Conv2d, rules.Gamma(gamma=0.5))])


def test_norm_on_residual_sum_matches_zennit(generator):
    torch.manual_seed(3)
    model = randomize_biases(_Residual().double(), generator, std=0.3)
    x = signed_input((2, 4, 6, 6), torch.float64, generator)
    r = torch.randn(2, 2, 4, 4, dtype=torch.float64, generator=generator)
    expected = relevance(model, x, r, _residual_composite(zennit.rules))
    assert_rel_close(relevance(model, x, r, _residual_composite(lxt_ext.rules)), expected, 1e-10)


@pytest.mark.parametrize('make', [lambda: lxt_ext.rules.ZBox(-1., 1.), lambda: lxt_ext.rules.Flat(),
                                  lambda: lxt_ext.rules.Norm()], ids=['ZBox', 'Flat', 'Norm'])
def test_zbox_flat_and_norm_inactive_give_plain_gradient(make, generator):
    torch.manual_seed(3)
    model = randomize_biases(_Residual().double(), generator, std=0.3)
    x = signed_input((2, 4, 6, 6), torch.float64, generator)
    r = torch.randn(2, 2, 4, 4, dtype=torch.float64, generator=generator)
    plain = relevance(model, x, r)
    rule = make()
    composite = LayerMapComposite(layer_map=[(zennit.layer.Sum if isinstance(rule, lxt_ext.rules.Norm)
                                              else nn.Conv2d, rule)])
    inactive, active = inactive_and_active(composite, model, x, r)
    assert_rel_close(inactive, plain, 1e-12)
    assert (active - plain).abs().max() > 1e-6 * plain.abs().max()


@pytest.mark.parametrize('name', ['ZBox', 'Flat', 'Norm'])
def test_zbox_flat_and_norm_signatures_match_zennit(name):
    ours = inspect.signature(getattr(lxt_ext.rules, name)).parameters
    theirs = inspect.signature(getattr(zennit.rules, name)).parameters
    assert [(p.name, p.kind, p.default) for p in ours.values()] == [(p.name, p.kind, p.default)
                                                                      for p in theirs.values()]


@pytest.mark.parametrize('name,kwargs', [('ZBox', {'low': 0., 'high': 1., 'stabilizer': None}),
                                         ('ZBox', {'low': 0., 'high': 1., 'stabilizer': 'x'}),
                                         ('Flat', {'stabilizer': None}), ('Norm', {'stabilizer': [1e-6]})])
def test_zbox_flat_and_norm_argument_validation_matches_zennit(name, kwargs):
    with pytest.raises(Exception) as theirs:
        getattr(zennit.rules, name)(**kwargs)
    with pytest.raises(type(theirs.value)):
        getattr(lxt_ext.rules, name)(**kwargs)
