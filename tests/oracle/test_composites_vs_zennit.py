"""lxt_ext's composites against zennit's composites of the same name (the oracle) on torchvision
VGG16 and ResNet50 (random weights, no download) with zennit's canonizers, and on ResNet18 in
float64 at 1e-10."""
import copy
import inspect

import pytest
import torch
import torchvision
import zennit.composites
from zennit.torchvision import ResNetCanonizer, VGGCanonizer

import lxt_ext.composites
from conftest import assert_rel_close, randomize_batch_norms, relevance

NAMES = ['EpsilonGammaBox', 'EpsilonPlus', 'EpsilonAlpha2Beta1', 'EpsilonPlusFlat', 'EpsilonAlpha2Beta1Flat']
REGISTERED = {
    'lxt_ext_epsilon_gamma_box': 'EpsilonGammaBox',
    'lxt_ext_epsilon_plus': 'EpsilonPlus',
    'lxt_ext_epsilon_alpha2_beta1': 'EpsilonAlpha2Beta1',
    'lxt_ext_epsilon_plus_flat': 'EpsilonPlusFlat',
    'lxt_ext_epsilon_alpha2_beta1_flat': 'EpsilonAlpha2Beta1Flat',
}
CANONIZERS = {'vgg16': VGGCanonizer, 'resnet50': ResNetCanonizer}


@pytest.fixture(scope='module', params=['vgg16', 'resnet50'])
def model(request):
    torch.manual_seed(0)
    net = getattr(torchvision.models, request.param)(weights=None)
    return request.param, randomize_batch_norms(net, seed=1)


@pytest.fixture(scope='module')
def data():
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 64, 64, generator=generator)
    grad_output = torch.zeros(2, 1000)
    grad_output[0, 3] = grad_output[1, 7] = 1.
    return x, grad_output


def make(module, name, canonizer):
    kwargs = {'low': -3., 'high': 3.} if name == 'EpsilonGammaBox' else {}
    return getattr(module, name)(canonizers=[canonizer()], **kwargs)


@pytest.mark.parametrize('name', NAMES)
def test_composite_matches_zennit(model, data, name):
    arch, net = model
    x, one_hot = data

    def grad_output(y):  # the relevance of the explained logits
        return one_hot * y.detach()

    expected = relevance(net, x, grad_output, make(zennit.composites, name, CANONIZERS[arch]))
    actual = relevance(net, x, grad_output, make(lxt_ext.composites, name, CANONIZERS[arch]))
    assert_rel_close(actual, expected, 1e-4)


@pytest.fixture(scope='module')
def resnet18_float64():
    torch.manual_seed(0)
    return randomize_batch_norms(torchvision.models.resnet18(weights=None), seed=5).double()


@pytest.mark.parametrize('name', NAMES)
def test_composite_matches_zennit_in_float64(resnet18_float64, name):
    """The same comparison in float64 on ResNet18 (small input), where float32 rounding cannot hide a
    difference: both sides canonized by zennit's ResNetCanonizer (zennit 0.5.1's merged BatchNorm is
    not exactly the original model, but it is the same on both sides). Measured: max|diff| <= 2.1e-15
    x max|zennit relevance| over the five composites."""
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 32, 32, generator=generator, dtype=torch.float64)
    one_hot = torch.zeros(2, 1000, dtype=torch.float64)
    one_hot[0, 3] = one_hot[1, 7] = 1.

    def grad_output(y):
        return one_hot * y.detach()

    expected = relevance(resnet18_float64, x, grad_output, make(zennit.composites, name, ResNetCanonizer))
    actual = relevance(resnet18_float64, x, grad_output, make(lxt_ext.composites, name, ResNetCanonizer))
    assert expected.dtype == torch.float64
    assert_rel_close(actual, expected, 1e-10)


@pytest.mark.parametrize('name', ['EpsilonGammaBox', 'EpsilonPlusFlat'])
def test_model_unchanged_after_removal(model, data, name):
    arch, net = model
    x, one_hot = data
    # zennit 1.0's canonizers leave the zero biases they add for BatchNorm merging in the state_dict
    # (zennit 0.5 leaves it unchanged): the oracle is what applying and removing the canonizer leaves
    reference = copy.deepcopy(net)
    for handle in CANONIZERS[arch]().apply(reference):
        handle.remove()
    state = {key: value.clone() for key, value in reference.state_dict().items()}
    with torch.no_grad():
        before = net(x)
    xg = x.clone().requires_grad_()
    (plain_before,) = torch.autograd.grad(net(xg), xg, one_hot)
    composite = make(lxt_ext.composites, name, CANONIZERS[arch])
    composite.register(net)
    try:
        xg = x.clone().requires_grad_()
        torch.autograd.grad(net(xg), xg, one_hot)
    finally:
        composite.remove()
    with torch.no_grad():
        after = net(x)
    assert torch.equal(before, after)
    after_state = net.state_dict()
    assert after_state.keys() == state.keys()
    assert all(torch.equal(state[key], value) for key, value in after_state.items())
    # the plain gradient is back as well: the one taken before registering, bit for bit
    xg = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(net(xg), xg, one_hot)
    assert plain_before.abs().max() > 0
    assert torch.equal(grad, plain_before)
    assert all('forward' not in vars(module) for module in net.modules()), 'a patched forward was left behind'


def test_inactive_composite_gives_gradient(data):
    torch.manual_seed(0)
    net = randomize_batch_norms(torchvision.models.resnet18(weights=None), seed=3)
    x, one_hot = data
    plain = relevance(net, x, one_hot)
    composite = make(lxt_ext.composites, 'EpsilonGammaBox', ResNetCanonizer)
    xg = x.clone().requires_grad_()
    with composite.context(net) as modified:
        with composite.inactive():
            (inactive,) = torch.autograd.grad(modified(xg), xg, one_hot)
    # canonizers (merged BatchNorm) stay in place while inactive, so equality is up to float32 rounding
    assert_rel_close(inactive, plain, 1e-4)


@pytest.mark.parametrize('registered,name', sorted(REGISTERED.items()))
def test_registered_in_zennit(registered, name):
    assert zennit.composites.COMPOSITES[registered] is getattr(lxt_ext.composites, name)
    # the original zennit composites stay registered under their own names
    assert zennit.composites.COMPOSITES[registered[len('lxt_ext_'):]] is getattr(zennit.composites, name)


@pytest.mark.parametrize('name', NAMES)
def test_composite_signature_matches_zennit(name):
    ours = inspect.signature(getattr(lxt_ext.composites, name)).parameters
    theirs = inspect.signature(getattr(zennit.composites, name)).parameters
    assert {key: p.default for key, p in ours.items()} == {key: p.default for key, p in theirs.items()}


def _by_zennit_name(name, net, x, one_hot):
    """What zennit's example script (share/example/feed_forward.py) does with ``--composite name``: look the
    composite up in zennit's registry, pass ``low``/``high`` only for exactly 'epsilon_gamma_box'."""
    kwargs = {'low': -3., 'high': 3.} if name == 'epsilon_gamma_box' else {}
    composite = zennit.composites.COMPOSITES[name](canonizers=[VGGCanonizer()], **kwargs)
    return type(composite), relevance(net, x, lambda y: one_hot * y.detach(), composite)


@pytest.mark.parametrize('name', ['epsilon_gamma_box', 'epsilon_alpha2_beta1_flat'])
def test_zennit_registry_names_opt_in(data, name):
    torch.manual_seed(0)
    net = randomize_batch_norms(torchvision.models.vgg11_bn(weights=None), seed=4)
    x, one_hot = data
    cls = getattr(zennit.composites, REGISTERED[f'lxt_ext_{name}'])
    zennit_type, expected = _by_zennit_name(name, net, x, one_hot)
    assert zennit_type is cls
    with lxt_ext.composites.use_in_zennit_registry():
        fused_type, actual = _by_zennit_name(name, net, x, one_hot)
    assert fused_type is getattr(lxt_ext.composites, cls.__name__)
    assert_rel_close(actual, expected, 1e-4)
    # restored on leaving the block; the call form holds until restore()
    assert zennit.composites.COMPOSITES[name] is cls
    override = lxt_ext.composites.use_in_zennit_registry()
    try:
        assert zennit.composites.COMPOSITES[name] is getattr(lxt_ext.composites, cls.__name__)
    finally:
        override.restore()
    assert zennit.composites.COMPOSITES[name] is cls
