"""Errors a user meets with bad input, and what registering and removing does to a model."""
import pytest
import torch
from zennit.attribution import Gradient
from zennit.composites import LayerMapComposite
from zennit.types import Convolution

import lxt_ext
from lxt_ext.composites import EpsilonGammaBox
from lxt_ext.layers import UnsupportedLayerError
from lxt_ext.rules import AlphaBeta, Epsilon, Flat, Gamma, Norm, Pass, ZBox, ZPlus


def small_cnn():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(inplace=True),
        torch.nn.Conv2d(8, 8, 3, stride=2), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(8 * 7 * 7, 5),
    )
    for module in model.modules():
        if getattr(module, 'bias', None) is not None:
            torch.nn.init.normal_(module.bias, std=0.1)
    return model.eval()


def relevance(model, composite, x, target):
    x = x.clone().requires_grad_()
    with composite.context(model) as modified:
        y = modified(x)
        grad, = torch.autograd.grad(y, x, target)
    return grad


@pytest.mark.parametrize('module', [torch.nn.BatchNorm2d(3), torch.nn.ReLU(), torch.nn.MultiheadAttention(4, 2)])
def test_unsupported_module_is_named(module):
    with pytest.raises(UnsupportedLayerError, match=type(module).__name__):
        Gamma().register(module)


def test_padding_modes_and_asymmetric_same_are_refused():
    with pytest.raises(UnsupportedLayerError, match='reflect'):
        Epsilon().register(torch.nn.Conv2d(3, 4, 3, padding=1, padding_mode='reflect'))
    with pytest.raises(UnsupportedLayerError, match='same'):
        Epsilon().register(torch.nn.Conv2d(3, 4, 2, padding='same'))


def test_wrong_dtypes_raise_type_errors():
    layer = torch.nn.Linear(4, 3)
    composite = LayerMapComposite([(torch.nn.Linear, Epsilon())])
    with composite.context(layer):
        with pytest.raises(TypeError, match='float64'):
            layer(torch.randn(2, 4, dtype=torch.float64, requires_grad=True))


@pytest.mark.parametrize('rule', [Epsilon(), Gamma(), ZPlus(), AlphaBeta()])
@pytest.mark.parametrize('where', ['input', 'relevance'])
def test_nan_is_reported_not_propagated_silently(rule, where):
    layer = torch.nn.Conv2d(3, 4, 3)
    x = torch.randn(2, 3, 6, 6)
    if where == 'input':
        x[0, 1, 2, 2] = float('nan')
    x.requires_grad_()
    message = {'input': r'the input of Conv2d holds NaN', 'relevance': r'the relevance arriving at Conv2d .* holds NaN'}
    with LayerMapComposite([(Convolution, rule)]).context(layer):
        with pytest.raises(RuntimeError, match=message[where]):  # the input: in forward, where it enters
            y = layer(x)
            upstream = torch.ones_like(y)
            if where == 'relevance':
                upstream[1, 0, 0, 0] = float('nan')
            torch.autograd.grad(y, x, upstream)


def test_stabilizers_and_zero_params_lxt_ext_cannot_fuse_are_refused_clearly():
    with pytest.raises(NotImplementedError, match='callable'):
        Gamma(stabilizer=lambda z: z + 1e-3)
    with pytest.raises(NotImplementedError, match='weight'):
        Epsilon(zero_params=['weight'])
    with pytest.raises(ValueError, match='convention'):
        Epsilon(convention='implicit')
    with pytest.raises(NotImplementedError, match='weight'):
        ZBox(-1., 1., zero_params='weight')
    with pytest.raises(NotImplementedError, match='weight'):
        Flat(zero_params=['weight'])


def test_removal_restores_the_model_bitwise():
    model = small_cnn()
    x = torch.randn(2, 3, 16, 16)
    before = model(x)
    xg = x.clone().requires_grad_()
    plain_grad, = torch.autograd.grad(model(xg), xg, torch.ones(2, 5))
    composite = EpsilonGammaBox(low=-3., high=3.)
    with Gradient(model, composite) as attributor:
        _, rel = attributor(x, torch.eye(5)[[0, 1]])
    assert torch.isfinite(rel).all() and rel.abs().sum() > 0
    assert all('forward' not in module.__dict__ for module in model.modules())
    assert torch.equal(model(x), before)
    xg = x.clone().requires_grad_()
    assert torch.equal(torch.autograd.grad(model(xg), xg, torch.ones(2, 5))[0], plain_grad)


def test_registered_model_without_gradient_behaves_like_the_original():
    model = small_cnn()
    x = torch.randn(2, 3, 16, 16)
    before = model(x)
    composite = LayerMapComposite([(Convolution, Gamma()), (torch.nn.Linear, Epsilon())])
    with composite.context(model):
        with torch.no_grad():
            assert torch.equal(model(x), before)
        assert torch.equal(model(x), before)  # the input does not require a gradient


def test_reregistering_gives_the_same_relevance():
    model = small_cnn()
    x, target = torch.randn(2, 3, 16, 16), torch.eye(5)[[2, 3]]
    composite = LayerMapComposite([(Convolution, Gamma(gamma=0.5)), (torch.nn.Linear, Epsilon())])
    first = relevance(model, composite, x, target)
    second = relevance(model, composite, x, target)
    assert torch.equal(first, second)


def test_conservation_with_zero_biases():
    """With zero biases and tiny epsilon, the input relevance sums to the relevance put on the
    target (zennit's Gradient starts from the one-hot target, so 1 per sample)."""
    model = small_cnn()
    for module in model.modules():
        if getattr(module, 'bias', None) is not None:
            torch.nn.init.zeros_(module.bias)
    model = model.double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    target = torch.eye(5, dtype=torch.float64)[[0, 4]]
    composite = LayerMapComposite([(Convolution, Gamma(gamma=0.25, stabilizer=1e-12)),
                                   (torch.nn.Linear, Epsilon(epsilon=1e-12))])
    rel = relevance(model, composite, x, target)
    torch.testing.assert_close(rel.sum((1, 2, 3)), target.sum(1), rtol=1e-8, atol=1e-10)


def test_cuda_build_flag_is_a_bool():
    assert isinstance(lxt_ext.cuda_built(), bool)


def test_pass_hands_relevance_through_unchanged_like_zennits_pass():
    from zennit.rules import Pass as ZennitPass
    from zennit.types import Activation
    from lxt_ext.rules import Pass

    model = torch.nn.Sequential(torch.nn.BatchNorm1d(6).eval(), torch.nn.ReLU(), torch.nn.Tanh())
    x, upstream = torch.randn(4, 6), torch.randn(4, 6)
    results = []
    for rule in (ZennitPass(), Pass()):
        composite = LayerMapComposite([(Activation, rule), (torch.nn.BatchNorm1d, rule)])
        results.append(relevance(model, composite, x, upstream))
    assert torch.equal(results[1], upstream)
    assert torch.equal(results[0], results[1])


def test_pass_refuses_modules_that_change_the_shape():
    from lxt_ext.rules import Pass

    layer = torch.nn.Flatten()
    with LayerMapComposite([(torch.nn.Flatten, Pass())]).context(layer):
        with pytest.raises(TypeError, match='element-wise'):
            layer(torch.randn(2, 3, 4, requires_grad=True))


def test_norm_on_a_residual_sum_keeps_no_copy_of_the_block_input():
    """zennit's ResNet canonizer sums ``stack([identity, out])``; the block's first layer keeps the
    identity already, so Norm keeps only ``out``: no tensor of the stacked size stays for backward."""
    from zennit.layer import Sum

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.relu, self.sum = torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.ReLU(), Sum()

        def forward(self, x):
            return self.relu(self.sum(torch.stack([x, self.conv(x)], dim=-1)))

    block = Block()
    x = torch.randn(2, 4, 6, 6).relu_().requires_grad_()
    kept = {}

    def pack(tensor):
        kept[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    composite = LayerMapComposite([(torch.nn.ReLU, Pass()), (Sum, Norm()), (Convolution, Gamma())])
    with composite.context(block), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        y = block(x)
    parameters = {p.untyped_storage().data_ptr() for p in block.parameters()}
    activations = sorted(size for ptr, size in kept.items() if ptr not in parameters)
    # the conv's input (the identity, shared with Norm) and Norm's copy of the conv's output
    assert activations == [x.nbytes, x.nbytes]
    assert x.untyped_storage().data_ptr() in kept
    with composite.context(block):
        assert torch.isfinite(torch.autograd.grad(block(x), x, torch.ones_like(y))[0]).all()
