"""Behaviour of the ViT composites: conservation, misuse, checkpointing, removal, unmapped modules."""
import warnings

import pytest
import timm
import torch
import torchvision
import zennit.composites
from torch.utils.checkpoint import checkpoint
from zennit.attribution import Gradient

from lxt_ext.composites import LanguageTransformer, TransformerComposite, ViTEpsilon, ViTGamma
from lxt_ext.errors import UncoveredOperationError
from lxt_ext.rules import Epsilon
from lxt_ext.transformer import ActivationIdentity


def small_vit(seed=0, **overrides):
    torch.manual_seed(seed)
    config = dict(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64, num_classes=10)
    model = torchvision.models.VisionTransformer(**dict(config, **overrides)).eval()
    torch.nn.init.normal_(model.heads.head.weight, std=0.3)  # torchvision zero-initialises the head
    return model


def attribute(model, composite, x, target):
    with Gradient(model, composite) as attributor:
        output, relevance = attributor(x, target)
    return output.detach(), relevance


def test_conservation_cp_lrp(generator):
    """Biases, class token and position embedding zero (they would absorb relevance), small
    epsilon: with CP-LRP every rule is conservative, so the pixel relevance sums to the logit.
    (AttnLRP's softmax rule is not conservative by design; its relevance is checked against LXT.)"""
    model = small_vit()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith('bias') or name in ('class_token', 'encoder.pos_embedding'):
                param.zero_()
            elif 'ln' in name:  # LayerNorm weights away from 1, so that the norm rule matters
                param.normal_(1., 0.3, generator=generator)
    x = torch.randn(2, 3, 32, 32, generator=generator)
    target = torch.eye(10)[[1, 6]]
    output, relevance = attribute(model, ViTEpsilon(epsilon=1e-9, attention='cp'), x, lambda y: y * target)
    logits = (output * target).sum(1)
    torch.testing.assert_close(relevance.sum((1, 2, 3)), logits, rtol=1e-3, atol=0)


def test_relevance_differs_from_gradient_x_input(generator):
    """The composite changes the backward (a test that the rules are registered at all)."""
    model = small_vit()
    x = torch.randn(1, 3, 32, 32, generator=generator)
    target = torch.eye(10)[[2]]
    _, relevance = attribute(model, ViTEpsilon(), x, target)
    xg = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(model(xg), xg, target)
    assert (relevance - x * grad).abs().max() > 1e-2 * relevance.abs().max()


def test_no_grad_misuse_raises(generator):
    model = small_vit()
    x = torch.randn(1, 3, 32, 32, generator=generator)
    with torch.no_grad(), pytest.raises(RuntimeError, match='does not require grad'):
        attribute(model, ViTGamma(), x, torch.eye(10)[[0]])


class Checkpointed(torch.nn.Module):
    def __init__(self, block, reentrant):
        super().__init__()
        self.block, self.reentrant = block, reentrant

    def forward(self, x):
        return checkpoint(self.block, x, use_reentrant=self.reentrant)


@pytest.mark.parametrize('reentrant', [False, True])
def test_gradient_checkpointing_gives_the_same_relevance_or_is_refused(reentrant, generator):
    """Checkpointed blocks re-run their forward in backward: non-reentrant, the rules apply to the re-run and the
    relevance is the same; reentrant, the re-run happens outside the operation rules (its first forward runs
    without grad), so the forward refuses it, naming the fix. (Reentrant checkpointing refuses
    ``torch.autograd.grad``, so relevance is read from ``.backward()`` here.)"""
    model = small_vit()
    x = torch.randn(2, 3, 32, 32, generator=generator)
    target = torch.eye(10)[[3, 4]]

    def relevance():
        xg = x.clone().requires_grad_()
        with ViTGamma(attention='attnlrp').context(model) as modified:
            modified(xg).backward(target)
        return xg.grad

    expected = relevance()
    layers = model.encoder.layers
    for name, block in list(layers.named_children()):
        setattr(layers, name, Checkpointed(block, reentrant))
    if reentrant:
        with pytest.raises(UncoveredOperationError, match="CheckpointFunction.*'use_reentrant': False"):
            relevance()
        return
    actual = relevance()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item())


@pytest.mark.parametrize('composite', [ViTEpsilon, ViTGamma])
def test_removal_restores_the_model_bitwise(composite, generator):
    model = small_vit()
    model.train()  # dropout modules active: DropoutOff must give them back
    model.encoder.dropout.p = 0.5
    x = torch.randn(2, 3, 32, 32, generator=generator)
    torch.manual_seed(5)
    before = model(x)
    instance = composite()
    instance.register(model)
    assert any('forward' in vars(module) for module in model.modules())
    model(x.requires_grad_()).sum().backward()
    instance.remove()
    assert not any('forward' in vars(module) for module in model.modules())
    torch.manual_seed(5)
    assert torch.equal(model(x.detach()), before)


class Softsign(torch.nn.Module):
    def forward(self, x):
        return x / (1 + x.abs())


def test_unmapped_module_is_refused_at_its_operation_by_name():
    """A module no table knows, computing ``x / (1 + |x|)`` by hand: its ``abs`` has no rule, so the forward
    refuses it by operation, module and line before any relevance; ``strict=False`` warns instead; a rule from
    ``layer_map`` covers the module."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), Softsign(), torch.nn.Linear(8, 2))
    x = torch.randn(3, 4, requires_grad=True)
    composite = TransformerComposite(Epsilon())
    composite.register(model)
    with pytest.raises(UncoveredOperationError, match=r'abs in 1 \(Softsign\) at .*test_vit_behaviour.py:\d+'):
        model(x)
    composite.remove()
    assert not any('forward' in vars(module) for module in model.modules())  # nothing left registered
    lenient = TransformerComposite(Epsilon(), strict=False)
    with lenient.context(model), pytest.warns(UserWarning, match=r'(abs|div) in 1 \(Softsign\)'):
        model(x)
    with warnings.catch_warnings(), TransformerComposite(Epsilon(), layer_map=[(Softsign, ActivationIdentity())]
                                                         ).context(model):
        warnings.simplefilter('error')
        model(x)


@pytest.mark.parametrize('block,mlp', [('ParallelScalingBlock', None), ('Block', 'SwiGLU'), ('Block', 'GluMlp')])
def test_timm_blocks_computing_attention_or_gates_functionally_conserve(block, mlp):
    """timm's parallel-scaling blocks (attention and MLP from one fused projection, SDPA called functionally) and
    GLU/SwiGLU MLPs have no table entry: the operation rules cover them, and CP-LRP conserves."""
    from lxt_ext.diagnostics.conservation import zeroed
    kwargs = {'block_fn': getattr(timm.models.vision_transformer, block)}
    if mlp is not None:
        kwargs['mlp_layer'] = getattr(timm.layers, mlp)
    torch.manual_seed(0)
    model = timm.create_model('vit_base_patch16_224', pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                              depth=2, num_heads=4, num_classes=10, **kwargs).eval()
    torch.nn.init.normal_(model.head.weight, std=0.1)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)).requires_grad_()
    with zeroed(model), ViTEpsilon(attention='cp', epsilon=1e-12).context(model):
        logit = model(x)[:, 3]
        (relevance,) = torch.autograd.grad(logit, x, logit.detach())
    torch.testing.assert_close(relevance.flatten(1).sum(1), logit.detach(), rtol=1e-4, atol=1e-6)


def test_language_transformer_explains_input_embeddings(generator):
    """No first-layer rule: the gradient is per unit of the input, relevance is ``x * g``; with CP-LRP
    and zero biases it sums to the explained output (the seed at the output is its relevance)."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(16, 4, 32, dropout=0.1, batch_first=True, bias=False, norm_first=True)
    model = torch.nn.Sequential(layer, torch.nn.Linear(16, 3, bias=False)).eval()
    x = torch.randn(2, 5, 16, generator=generator, requires_grad=True)
    with LanguageTransformer(attention='cp', epsilon=1e-9).context(model) as modified:
        output = modified(x)[:, -1, 0]
        (grad,) = torch.autograd.grad(output, x, output.detach())
    torch.testing.assert_close((x * grad).sum(), output.detach().sum(), rtol=1e-3, atol=0)


def test_composites_are_in_zennits_registry():
    assert zennit.composites.COMPOSITES['lxt_ext_vit_epsilon'] is ViTEpsilon
    assert zennit.composites.COMPOSITES['lxt_ext_vit_gamma'] is ViTGamma
    assert zennit.composites.COMPOSITES['lxt_ext_language_transformer'] is LanguageTransformer


def test_mlp_keeps_the_activation_input_once(generator):
    """In ViTGamma the MLP's second Linear consumes GELU's output; its gamma rule keeps GELU's input
    (which the identity rule keeps anyway) and recomputes the output in backward, so no saved
    tensor of the forward pass is a GELU output."""
    model = small_vit()
    gelu_outputs, saved = [], []
    # the outputs themselves are held, so that no later tensor can reuse their memory (and address)
    handles = [module.register_forward_hook(lambda m, i, o: gelu_outputs.append(o))
               for module in model.modules() if isinstance(module, torch.nn.GELU)]
    x = torch.randn(2, 3, 32, 32, generator=generator)
    composite = ViTGamma()
    with composite.context(model), torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t.data_ptr()) or t, lambda t: t):
        y = model(x.requires_grad_())
    for handle in handles:
        handle.remove()
    assert gelu_outputs and not {o.data_ptr() for o in gelu_outputs} & set(saved)
    assert y.grad_fn is not None


def test_timm_attention_takes_sdpa_bool_masks(generator):
    """timm passes SDPA's masks (bool: True = attend) to attention_lrp unchanged: the forward is timm's own,
    the relevance that of the equivalent additive mask (-inf where attention is not allowed)."""
    torch.manual_seed(0)
    attention = timm.layers.Attention(16, num_heads=4).eval()
    x = torch.randn(2, 5, 16, generator=generator)
    allowed = torch.rand(2, 1, 5, 5, generator=generator) > 0.3
    allowed[..., 0] = True  # every query sees a key
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, float('-inf'))
    with torch.no_grad():
        expected = attention(x, attn_mask=allowed)
    results = []
    for mask in (allowed, additive):
        with ViTEpsilon().context(attention) as modified:
            xg = x.clone().requires_grad_()
            output = modified(xg, attn_mask=mask)
            (grad,) = torch.autograd.grad(output, xg, torch.ones_like(output))
        results.append((output.detach(), grad))
    torch.testing.assert_close(results[0][0], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-7)
    assert results[0][1].abs().sum() > 0


def test_the_removed_epsilon_keyword_of_the_input_stabilizer_is_refused():
    """0.3.0 dropped the old spelling (CHANGELOG.md): ``epsilon`` is the LRP epsilon only."""
    with pytest.raises(TypeError, match="unexpected keyword argument 'epsilon'"):
        TransformerComposite(Epsilon(), epsilon=1e-7)
    with pytest.raises(TypeError, match="unexpected keyword argument 'epsilon'"):
        ActivationIdentity(epsilon=1e-7)
    assert TransformerComposite(Epsilon(), input_stabilizer=1e-7).options.input_stabilizer == 1e-7
