"""BatchNorm folding in lxt_ext's composites (lxt_ext.batch_norm_fold): the oracle is the model as zennit's
own canonizers leave it (merged weight copies) and zennit's composites on it."""
import pytest
import torch
import torchvision
import zennit.composites
import zennit.rules
from zennit.canonizers import SequentialMergeBatchNorm
from zennit.torchvision import ResNetCanonizer

import lxt_ext.composites
from conftest import assert_rel_close, randomize_batch_norms, relevance


@pytest.fixture(scope='module')
def resnet():
    torch.manual_seed(0)
    return randomize_batch_norms(torchvision.models.resnet18(weights=None), seed=1)


def _box(module):
    return module.EpsilonGammaBox(low=-3., high=3., canonizers=[ResNetCanonizer()])


def test_forward_bitwise_as_zennit_merged(resnet):
    """The folded weight is formed by zennit's expression: outputs are bitwise those of zennit's merged
    model, with and without gradients asked for."""
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    outputs = {}
    for module in (zennit.composites, lxt_ext.composites):
        with _box(module).context(resnet) as canonized:
            with torch.no_grad():
                plain = canonized(x)
            outputs[module.__name__] = plain, canonized(x.clone().requires_grad_()).detach()
    (zennit_plain, zennit_grad), (ours_plain, ours_grad) = outputs.values()
    assert torch.equal(ours_plain, zennit_plain)
    assert torch.equal(ours_grad, zennit_grad)


def test_no_merged_weight_kept(resnet):
    """While registered, every merged convolution holds its original weight storage, no merged copy."""
    convs = [m for m in resnet.modules() if isinstance(m, torch.nn.Conv2d)]
    storage = {conv: conv.weight.untyped_storage().data_ptr() for conv in convs}
    zennit_composite = _box(zennit.composites)
    with zennit_composite.context(resnet):  # the oracle: zennit's canonizer does copy each of them
        assert all(conv.weight.untyped_storage().data_ptr() != storage[conv] for conv in convs)
    composite = _box(lxt_ext.composites)
    with composite.context(resnet):
        assert all(conv.weight.untyped_storage().data_ptr() == storage[conv] for conv in convs)
        folded = [hook for hook in composite.hook_refs if getattr(hook, 'fold', None) is not None]
        assert len(folded) == len(convs)  # every resnet convolution is followed by a BatchNorm


def _mlp_and_convs():
    """Linear+BatchNorm1d, Conv1d+BatchNorm1d, Conv2d+BatchNorm2d and ConvTranspose2d+BatchNorm2d in a row."""
    torch.manual_seed(3)
    model = torch.nn.Sequential(
        torch.nn.Conv1d(4, 6, 3, padding=1), torch.nn.BatchNorm1d(6), torch.nn.ReLU(),
        torch.nn.Unflatten(1, (6, 1)),
        torch.nn.Conv2d(6, 5, (1, 3), padding=(0, 1), bias=False), torch.nn.BatchNorm2d(5), torch.nn.ReLU(),
        torch.nn.ConvTranspose2d(5, 4, (1, 3), padding=(0, 1)), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 8, 7), torch.nn.BatchNorm1d(7), torch.nn.ReLU(),
        torch.nn.Linear(7, 3),
    )
    return randomize_batch_norms(model, seed=4)


@pytest.mark.parametrize('layer_map', [None, 'zennit_conv2d'], ids=['all-lxt-rules', 'zennit-rule-on-conv2d'])
def test_relevance_as_zennit_on_every_layer_type(layer_map):
    """Linear and Conv1d/2d are folded; ConvTranspose2d, and a layer given a zennit rule, keep zennit's
    merged copy. Either way the relevance is zennit's composite's."""
    model = _mlp_and_convs()
    x = torch.randn(5, 4, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    model.double()
    grad_output = torch.eye(3, dtype=torch.float64)[[0, 1, 2, 0, 1]]
    kwargs = {'canonizers': [SequentialMergeBatchNorm()]}
    if layer_map:
        kwargs['layer_map'] = [(torch.nn.Conv2d, zennit.rules.Epsilon(epsilon=1e-3))]
    expected = relevance(model, x, grad_output, zennit.composites.EpsilonPlus(**kwargs))
    composite = lxt_ext.composites.EpsilonPlus(**kwargs)
    actual = relevance(model, x, grad_output, composite)
    assert_rel_close(actual, expected, 1e-10)
    with composite.context(model):
        folded = {type(hook._module).__name__ for hook in composite.hook_refs if getattr(hook, 'fold', None)}
    assert folded == ({'Conv1d', 'Linear'} if layer_map else {'Conv1d', 'Conv2d', 'Linear'})


def test_inactive_is_gradient_of_canonized_model():
    """Inactive, the folded layers compute the canonized model's plain gradient; zennit's inactive composite
    on its merged model is the oracle (not the original model: zennit 0.5's merged BatchNorm still divides
    by sqrt(1 + eps))."""
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    one_hot = torch.eye(1000, dtype=torch.float64)[[3, 7]]
    # a model of its own: zennit 1.0's canonizers leave the parameters as plain attributes, which
    # Module.double() then misses
    torch.manual_seed(0)
    model = randomize_batch_norms(torchvision.models.resnet18(weights=None).double(), seed=1)
    inactive = {}
    for module in (zennit.composites, lxt_ext.composites):
        composite = _box(module)
        xg = x.clone().requires_grad_()
        with composite.context(model) as canonized, composite.inactive():
            (inactive[module.__name__],) = torch.autograd.grad(canonized(xg), xg, one_hot)
    assert_rel_close(inactive['lxt_ext.composites'], inactive['zennit.composites'], 1e-10)


def test_mixin_folds_in_a_composite_of_ones_own():
    """``BatchNormFolding`` on zennit's ``LayerMapComposite`` with lxt_ext rules: zennit's composite with
    zennit's rules is the oracle; the lxt_ext-ruled layers are folded."""
    import lxt_ext.rules
    from zennit.types import Activation, BatchNorm

    class Folding(lxt_ext.composites.BatchNormFolding, zennit.composites.LayerMapComposite):
        pass

    def layer_map(rules):
        return [(Activation, rules.Pass()), (BatchNorm, rules.Pass()), (torch.nn.Conv1d, rules.Gamma(gamma=0.5)),
                (torch.nn.Conv2d, rules.Gamma(gamma=0.5)), (torch.nn.ConvTranspose2d, rules.Epsilon()),
                (torch.nn.Linear, rules.Epsilon())]

    model = _mlp_and_convs().double()
    x = torch.randn(5, 4, 8, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    grad_output = torch.eye(3, dtype=torch.float64)[[2, 1, 0, 2, 1]]
    canonizers = [SequentialMergeBatchNorm()]
    expected = relevance(model, x, grad_output,
                         zennit.composites.LayerMapComposite(layer_map(zennit.rules), canonizers=canonizers))
    composite = Folding(layer_map(lxt_ext.rules), canonizers=[SequentialMergeBatchNorm()])
    assert_rel_close(relevance(model, x, grad_output, composite), expected, 1e-10)
    with composite.context(model):
        folded = {type(hook._module).__name__ for hook in composite.hook_refs if getattr(hook, 'fold', None)}
    assert folded == {'Conv1d', 'Conv2d', 'Linear'}
