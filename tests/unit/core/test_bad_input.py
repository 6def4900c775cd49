"""Bad input through every kind of rule: each a clear error naming the cause, or (empty batches, zero-sized
dimensions, channels_last and non-contiguous inputs) the relevance of the well-formed case."""
import pytest
import torch
import torchvision
from zennit.attribution import Gradient

import lxt_ext.composites as composites
from lxt_ext.attribution import Explainer
from lxt_ext.checks import NonFiniteError


def cnn():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AvgPool2d(2),
                               torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 5)).eval()


def vit():
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=2,
                                                 hidden_dim=16, mlp_dim=32, num_classes=5).eval()
    torch.nn.init.normal_(model.heads.head.weight, std=0.3)  # torchvision zero-initialises the head
    return model


# model, composite, input size, the first layer's name, the rule kinds it exercises
CASES = {
    'epsilon_gamma_box': (cnn, lambda: composites.EpsilonGammaBox(low=-3., high=3.), 8, '0'),   # ZBox, Norm, Epsilon
    'epsilon_plus_flat': (cnn, composites.EpsilonPlusFlat, 8, '0'),                            # Flat, ZPlus, Pass
    'vit_epsilon': (vit, composites.ViTEpsilon, 16, 'conv_proj'),      # OutputEpsilon, attention, norms, identity
    'vit_gamma': (vit, composites.ViTGamma, 16, 'conv_proj'),                                   # Gamma, CP-LRP
}


def attribute(model, composite, x, seed=None):
    seed = torch.eye(5, dtype=x.dtype)[[0] * len(x)] if seed is None else seed
    with Gradient(model, composite) as attributor:
        return attributor(x, seed)[1]


@pytest.fixture(params=sorted(CASES))
def case(request):
    build, composite, size, first = CASES[request.param]
    generator = torch.Generator().manual_seed(1)
    return build, composite, torch.rand(2, 3, size, size, generator=generator), first


@pytest.mark.parametrize('value,kind', [(float('nan'), 'NaN'), (float('inf'), 'Inf')])
def test_non_finite_input_is_named_where_it_enters(case, value, kind):
    build, composite, x, first = case
    x[1, 2, 3, 4] = value
    with pytest.raises(NonFiniteError, match=rf"the input of '{first}' \(Conv2d\) holds {kind}"):
        attribute(build(), composite(), x)


def test_non_finite_output_seed_is_named(case):
    build, composite, x, _ = case
    seed = torch.zeros(2, 5)
    seed[0, 1] = float('nan')
    with pytest.raises(NonFiniteError, match=r"the relevance arriving at '.*' \(Linear\) \(from the output seed"):
        attribute(build(), composite(), x, seed)


def test_non_finite_weight_is_named_at_registration(case):
    build, composite, x, first = case
    model = build()
    with torch.no_grad():
        model.get_submodule(first).weight[0, 0, 0, 0] = float('inf')
    with pytest.raises(NonFiniteError, match=rf"the weight of '{first}' \(Conv2d\) holds Inf"):
        attribute(model, composite(), x)
    assert not any('forward' in vars(module) for module in model.modules()), 'a failed registration left rules'


def test_a_weight_made_non_finite_after_an_attribution_is_named_at_the_next_registration(case, monkeypatch):
    # registration reads a parameter again only when its content may have changed (lxt_ext.checks.parameter)
    import lxt_ext.checks as checks
    build, composite, x, first = case
    model = build()
    reads = []
    ensure_finite = checks.ensure_finite

    def recorded(tensor, what):
        what = what() if callable(what) else what
        if what.startswith(('the weight', 'the bias')):
            reads.append(what)
        return ensure_finite(tensor, what)
    monkeypatch.setattr(checks, 'ensure_finite', recorded)
    attribute(model, composite(), x)
    assert f"the weight of '{first}' (Conv2d)" in reads
    reads.clear()
    attribute(model, composite(), x)
    assert reads == [], 'unchanged parameters were read again'
    weight = model.get_submodule(first).weight
    with torch.no_grad():
        weight[0, 0, 0, 0] = float('nan')
    with pytest.raises(NonFiniteError, match=rf"the weight of '{first}' \(Conv2d\) holds NaN"):
        attribute(model, composite(), x)
    with torch.no_grad():
        weight[0, 0, 0, 0] = 0.
    model.get_submodule(first).weight = torch.nn.Parameter(torch.full_like(weight, float('inf')))
    with pytest.raises(NonFiniteError, match=rf"the weight of '{first}' \(Conv2d\) holds Inf"):
        attribute(model, composite(), x)


@pytest.mark.parametrize('dtype,message', [(torch.int64, 'floating'), (torch.complex64, 'floating'),
                                           (torch.float64, 'differs from the weight dtype')])
def test_wrong_dtypes_are_named(case, dtype, message):
    build, composite, x, _ = case
    x = x.to(dtype)
    with pytest.raises((TypeError, RuntimeError), match=message):
        with Gradient(build(), composite()) as attributor:
            attributor(x if dtype.is_floating_point or dtype.is_complex else x, torch.zeros(2, 5))


def test_input_on_another_device_is_named(case):
    build, composite, x, _ = case
    with pytest.raises(ValueError, match='input on meta but the weight on cpu'):
        attribute(build(), composite(), x.to('meta'), torch.zeros(2, 5, device='meta'))


def test_empty_batch_gives_empty_relevance(case):
    build, composite, x, _ = case
    relevance = attribute(build(), composite(), x[:0], torch.zeros(0, 5))
    assert relevance.shape == x[:0].shape


@pytest.mark.parametrize('layout', ['channels_last', 'transposed'])
def test_memory_layouts_give_the_contiguous_relevance(case, layout):
    build, composite, x, _ = case
    expected = attribute(build(), composite(), x)
    if layout == 'channels_last':
        other = x.contiguous(memory_format=torch.channels_last)
    else:
        other = x.transpose(2, 3).contiguous().transpose(2, 3)  # the same values, strides swapped
    assert not other.is_contiguous() and torch.equal(other, x)
    torch.testing.assert_close(attribute(build(), composite(), other), expected, rtol=1e-5, atol=1e-7)


def test_second_order_use_is_a_clear_error(case):
    build, composite, x, _ = case
    model = build()
    with composite().context(model) as modified:
        x = x.requires_grad_()
        with pytest.raises(RuntimeError, match='once-differentiable.*create_graph=True'):
            torch.autograd.grad(modified(x)[:, 0].sum(), x, create_graph=True)


def test_two_composites_on_one_model_are_refused_and_leave_the_first(case):
    build, composite, x, _ = case
    model = build()
    expected = attribute(model, composite(), x)
    first, second = composite(), composite()
    first.register(model)
    try:
        with pytest.raises(RuntimeError, match='already has the lxt_ext rule'):
            second.register(model)
        xg = x.clone().requires_grad_()
        (relevance,) = torch.autograd.grad(model(xg), xg, torch.eye(5)[[0, 0]])
        torch.testing.assert_close(relevance, expected)  # the first composite still works as before
        first.register(model)  # registering the same composite again replaces its own registration
    finally:
        first.remove()
    assert not any('forward' in vars(module) or '_lxt_ext_rule' in vars(module) for module in model.modules())


def language_model():
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(8, 2, 16, batch_first=True, norm_first=True)
    return torch.nn.Sequential(layer, torch.nn.Linear(8, 3)).eval()


def explain(model, x, target=0):
    with Explainer(model, composites.LanguageTransformer()) as attributor:
        return attributor(x, target)[1]


@pytest.mark.parametrize('where,message', [
    ('input', 'the input holds NaN'),
    ('seed', r'the output relevance seed \(target\) holds NaN'),
    ('weight', r"the in_proj_weight of '0.self_attn' \(MultiheadAttention\) holds NaN"),
    ('linear weight', r"the weight of '1' \(Linear\) holds NaN"),  # no rule (epsilon 0: the plain gradient)
])
def test_gradient_x_input_names_non_finite_values(where, message):
    model, x = language_model(), torch.randn(2, 4, 8)
    target = 0
    if where == 'input':
        x[0, 1, 2] = float('nan')
    elif where == 'seed':
        target = torch.full((2, 4, 3), float('nan'))
    elif where == 'weight':
        with torch.no_grad():
            model[0].self_attn.in_proj_weight[1, 1] = float('nan')
    else:
        with torch.no_grad():
            model[1].weight[1, 1] = float('nan')
    with pytest.raises(NonFiniteError, match=message):
        explain(model, x, target)


@pytest.mark.parametrize('make,error,message', [
    (lambda x: x.long(), TypeError, 'floating tensor input'),
    (lambda x: x.double(), TypeError, 'differs from the dtype torch.float32'),
    (lambda x: x.to('meta'), ValueError, 'the input is on meta but Sequential is on cpu'),
])
def test_gradient_x_input_names_wrong_inputs(make, error, message):
    with pytest.raises(error, match=message):
        explain(language_model(), make(torch.randn(2, 4, 8)))


def test_gradient_x_input_zero_sized_and_strided_inputs():
    model, x = language_model(), torch.randn(2, 4, 8)
    assert explain(model, x[:0], torch.zeros(0, 4, 3)).shape == (0, 4, 8)
    assert explain(model, x[:, :0], torch.zeros(2, 0, 3)).shape == (2, 0, 8)
    strided = x.transpose(1, 2).contiguous().transpose(1, 2)
    assert not strided.is_contiguous()
    torch.testing.assert_close(explain(model, strided), explain(model, x), rtol=1e-5, atol=1e-7)


def test_multihead_attention_names_a_dtype_mismatch():
    model = language_model()
    with pytest.raises(TypeError, match=r'MultiheadAttention: input dtype torch.float64 differs'):
        with composites.LanguageTransformer().context(model) as modified:
            modified[0].self_attn(*(torch.randn(2, 4, 8, dtype=torch.float64, requires_grad=True),) * 3)


def test_cpu_checks_off_skip_the_per_layer_checks_not_the_attributors(monkeypatch):
    import lxt_ext.checks as checks
    model, x = vit(), torch.rand(2, 3, 16, 16)
    seed = torch.eye(5)[[0, 0]]
    seed[1, 0] = float('nan')
    monkeypatch.setitem(checks._ENABLED, 'cpu', True)
    with pytest.raises(NonFiniteError, match=r"the relevance arriving at 'heads.head' \(Linear\)"):
        attribute(model, composites.ViTEpsilon(), x, seed)
    checks.cpu_checks(False)
    assert not checks.cpu_checks()
    # zennit's attributor checks nothing: the first fused C++ rule on the way (the patch embedding) stops it
    with pytest.raises(RuntimeError, match='the epsilon rule produced NaN or Inf') as error:
        attribute(model, composites.ViTEpsilon(), x, seed)
    assert not isinstance(error.value, NonFiniteError)
    with Explainer(model, composites.ViTEpsilon()) as attributor:
        with pytest.raises(NonFiniteError, match='the output relevance seed'):
            attributor(x, seed)


def overflowing_vit():
    """The ViT of CASES with finite weights whose MLP overflows float32: its first Linear's output holds Inf."""
    model = vit()
    mlp = model.encoder.layers[0].mlp
    with torch.no_grad():
        mlp[0].weight.uniform_(-1e38, 1e38, generator=torch.Generator().manual_seed(0))
    return model, [name for name, module in model.named_modules() if module is mlp[1]][0]


@pytest.mark.parametrize('checks_on', [True, False], ids=['checks_on', 'checks_off'])
def test_attributors_name_the_layer_where_a_value_overflows(checks_on, monkeypatch):
    """The attributors run without per-layer checks (lxt_ext.checks.located); the failed result is attributed
    again with them, on every device (here: with the CPU's switched off too), to name the layer."""
    import lxt_ext.checks as checks
    from lxt_ext.attribution import explain_batch
    monkeypatch.setitem(checks._ENABLED, 'cpu', checks_on)
    model, activation = overflowing_vit()
    x = torch.rand(2, 3, 16, 16)
    message = rf"the input of '{activation}' \(GELU\) holds (Inf|NaN)"
    with Explainer(model, composites.ViTEpsilon()) as attributor:
        with pytest.raises(NonFiniteError, match=message):
            attributor(x, 0)
    with pytest.raises(NonFiniteError, match=message):
        explain_batch(model, x, composites.ViTEpsilon(), target=0)
    assert checks._ENABLED['cpu'] == checks_on and getattr(checks._LOCAL, 'mode', None) is None


def test_attributors_run_the_per_layer_checks_only_after_a_failure(monkeypatch):
    import lxt_ext.checks as checks
    monkeypatch.setitem(checks._ENABLED, 'cpu', True)
    calls = []
    ensure_finite = checks.ensure_finite
    monkeypatch.setattr(checks, 'ensure_finite', lambda tensor, what: calls.append(what) or ensure_finite(tensor, what))
    model, x = vit(), torch.rand(2, 3, 16, 16)
    with Explainer(model, composites.ViTEpsilon()) as attributor:
        calls.clear()  # registration checked the weights
        attributor(x, 0)
    assert calls == ['the input', 'the output relevance seed (target)', calls[-1]] and 'input relevance' in calls[-1]
    calls.clear()
    attribute(model, composites.ViTEpsilon(), x)  # zennit's attributor: the per-layer checks, in passing
    assert len(calls) > 10
