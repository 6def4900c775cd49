"""lxt_ext's ViT composites vs LXT 2.1 (the transformers oracle), run in its own environment.

- torchvision vit_b_16, the published recipe (CP-LRP, zennit Gamma 0.25 on Conv2d and 0.05 on
  Linear under LXT's ``monkey_patch`` + ``monkey_patch_zennit``): LXT leaves nn.MultiheadAttention's
  projections (called functionally) at the plain gradient, so lxt_ext's composite is told to as well.
- a small torchvision ViT with epsilon everywhere and AttnLRP, which LXT does not ship for
  torchvision: built in the oracle from LXT's own pieces (divide_gradient on q/k/v, identity rule on
  GELU, LXT's LayerNorm forward, zennit Epsilon with LXT's patch).
- timm ViTs, whose attention calls its projections as modules, so the LXT-style oracle reaches every
  Linear: the gamma recipe (CP-LRP) and epsilon with AttnLRP, compared over the whole model.

Relevance on both sides is per pixel; the bound is max|diff| <= 1e-3 * max|LXT relevance|.
"""
import pytest
import timm
import torch
import torchvision
import zennit.rules
from zennit.attribution import Gradient

import conftest
import lxt_oracle
from conftest import assert_rel_close
from lxt_ext.attention import MultiheadAttentionRule
from lxt_ext.composites import ViTEpsilon, ViTGamma

# every test takes the ``oracle`` fixture: without .oracle a skip locally, a failure in CI (conftest.require)

# LXT's monkey_patch(vision_transformer) patches torch.nn's GELU, LayerNorm and MultiheadAttention
# classes in the oracle process; CP-LRP there detaches query and key of every attention.
_TORCHVISION_ORACLE = '''
import torch
from torchvision.models import vision_transformer
from zennit.composites import LayerMapComposite
import zennit.rules as z
from lxt.efficient import monkey_patch, monkey_patch_zennit
from lxt.efficient.rules import divide_gradient
from lxt.efficient.patches import patch_method, non_linear_forward, layer_norm_forward
import torch.nn.functional as F

def attnlrp_mha_forward(self, query, key, value, need_weights=False, **kwargs):
    # torchvision's self-attention (batch_first, q is k is v), projections at the plain gradient as in
    # LXT's CP patch; AttnLRP as LXT patches transformers' attention: divide_gradient on q, k, v
    B, N, E = query.shape
    H = self.num_heads
    q, k, v = F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, -1)
    q, k, v = (t.reshape(B, N, H, E // H).transpose(1, 2) for t in (q, k, v))
    q, k, v = divide_gradient(q, 4), divide_gradient(k, 4), divide_gradient(v, 2)
    p = (q @ k.transpose(-2, -1) * (E // H) ** -0.5).softmax(-1)
    o = (p @ v).transpose(1, 2).reshape(B, N, E)
    return F.linear(o, self.out_proj.weight, self.out_proj.bias), None

if inputs['mode'] == 'gamma':
    monkey_patch(vision_transformer)
    rules = [(torch.nn.Conv2d, z.Gamma(0.25)), (torch.nn.Linear, z.Gamma(0.05))]
else:
    nn = vision_transformer.nn
    monkey_patch(vision_transformer, {
        nn.GELU: lambda c: patch_method(non_linear_forward, c, keep_original=True),
        nn.LayerNorm: lambda c: patch_method(layer_norm_forward, c),
        nn.MultiheadAttention: lambda c: patch_method(attnlrp_mha_forward, c),
    })
    rules = [(torch.nn.Conv2d, z.Epsilon(1e-6)), (torch.nn.Linear, z.Epsilon(1e-6))]
monkey_patch_zennit()
model = getattr(vision_transformer, inputs['name'])(**inputs['kwargs'])
model.load_state_dict(inputs['state'])
model.eval()
first = {'flat': lambda: z.Flat(), 'zbox': lambda: z.ZBox(low=-3., high=3.)}.get(inputs.get('first'))
if first is None:
    composite = LayerMapComposite(rules)
else:
    from zennit.composites import SpecialFirstLayerMapComposite
    composite = SpecialFirstLayerMapComposite(layer_map=rules, first_map=[(torch.nn.Conv2d, first())])
composite.register(model)
x = inputs['x'].clone().requires_grad_()
y = model(x)
y.backward(inputs['target'])
outputs['relevance'] = (x * x.grad).detach()
outputs['logits'] = y.detach()
'''


_VIT_B_16 = ('vit_b_16', {})
_SMALL_VIT = ('VisionTransformer', dict(image_size=32, patch_size=8, num_layers=3, num_heads=4, hidden_dim=32,
                                        mlp_dim=64, num_classes=10))


def _torchvision_model(spec, seed=0):
    name, kwargs = spec
    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)(**kwargs).eval()
    # torchvision zero-initialises the head: logits and relevance would all be zero
    torch.nn.init.normal_(model.heads.head.weight, std=model.heads.head.in_features ** -0.5)
    torch.nn.init.normal_(model.heads.head.bias, std=0.1)
    return model


def _attribute(model, composite, x, target):
    """LXT backpropagates ``target`` as the gradient of the logits; in zennit's convention, which lxt_ext keeps,
    the seed is relevance: the same explanation is seeded with ``logits * target``."""
    with Gradient(model, composite) as attributor:
        output, relevance = attributor(x, lambda y: y * target)
    return output.detach(), relevance


def test_vit_b_16_gamma_recipe_matches_lxt(oracle):
    model = _torchvision_model(_VIT_B_16)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    target = torch.eye(1000)[[3]]
    lxt = oracle.run(_TORCHVISION_ORACLE, mode='gamma', name=_VIT_B_16[0], kwargs=_VIT_B_16[1],
                         state=model.state_dict(), x=x, target=target)
    plain_projections = [(torch.nn.MultiheadAttention, MultiheadAttentionRule('cp', linear_rule=None))]
    output, relevance = _attribute(model, ViTGamma(layer_map=plain_projections), x, target)
    torch.testing.assert_close(output, lxt['logits'], rtol=1e-5, atol=1e-4)
    assert_rel_close(relevance, lxt['relevance'], 1e-3)


def test_small_torchvision_vit_epsilon_attnlrp_matches_lxt_pieces(oracle):
    model = _torchvision_model(_SMALL_VIT)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    target = torch.eye(10)[[1, 4, 7]]
    lxt = oracle.run(_TORCHVISION_ORACLE, mode='epsilon', name=_SMALL_VIT[0], kwargs=_SMALL_VIT[1],
                         state=model.state_dict(), x=x, target=target)
    plain_projections = [(torch.nn.MultiheadAttention, MultiheadAttentionRule('attnlrp', linear_rule=None))]
    output, relevance = _attribute(model, ViTEpsilon(layer_map=plain_projections), x, target)
    torch.testing.assert_close(output, lxt['logits'], rtol=1e-5, atol=1e-5)
    assert_rel_close(relevance, lxt['relevance'], 1e-3)


@pytest.mark.parametrize('first', ['flat', 'zbox'])
def test_zennit_rules_in_the_composite_match_lxts_patched_zennit(first, oracle):
    """zennit's Flat/ZBox as ``first_rule`` and zennit's Epsilon on every Linear, adapted per hook,
    vs the same zennit rules under LXT's global ``monkey_patch_zennit``."""
    model = _torchvision_model(_SMALL_VIT)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4)).clamp(-3., 3.)
    target = torch.eye(10)[[0, 9]]
    lxt = oracle.run(_TORCHVISION_ORACLE, mode='epsilon', first=first, name=_SMALL_VIT[0], kwargs=_SMALL_VIT[1],
                         state=model.state_dict(), x=x, target=target)
    first_rule = zennit.rules.Flat() if first == 'flat' else zennit.rules.ZBox(low=-3., high=3.)
    layer_map = [(torch.nn.MultiheadAttention, MultiheadAttentionRule('attnlrp', linear_rule=None)),
                 (torch.nn.Linear, zennit.rules.Epsilon(1e-6))]
    _, relevance = _attribute(model, ViTEpsilon(first_rule=first_rule, layer_map=layer_map), x, target)
    assert_rel_close(relevance, lxt['relevance'], 1e-3)


# timm in the LXT style: the attention core patched as LXT patches transformers' attention
# functions (CP: query and key detached; AttnLRP: divide_gradient 4, 4, 2), GELU and timm's
# LayerNorm patched with LXT's forwards, zennit rules (with LXT's patch) on every Conv2d and Linear.
_TIMM_ORACLE = '''
import torch
import timm
from timm.layers import attention as timm_attention, norm as timm_norm
from zennit.composites import LayerMapComposite
import zennit.rules as z
from lxt.efficient import monkey_patch_zennit
from lxt.efficient.rules import divide_gradient, stop_gradient
from lxt.efficient.patches import non_linear_forward, layer_norm_forward

mode = inputs['mode']

def attention_forward(self, x, attn_mask=None, is_causal=False):
    B, N, C = x.shape
    q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = self.q_norm(q), self.k_norm(k)
    if mode == 'gamma':
        q, k = stop_gradient(q), stop_gradient(k)
    else:
        q, k, v = divide_gradient(q, 4), divide_gradient(k, 4), divide_gradient(v, 2)
    p = (q @ k.transpose(-2, -1) * self.scale).softmax(-1)
    return self.proj((p @ v).transpose(1, 2).reshape(B, N, self.attn_dim))

timm_attention.Attention.forward = attention_forward
timm_norm.LayerNorm.forward = layer_norm_forward
torch.nn.GELU.original_forward = torch.nn.GELU.forward
torch.nn.GELU.forward = non_linear_forward
monkey_patch_zennit()
model = timm.create_model(inputs['name'], pretrained=False, **inputs['kwargs'])
model.load_state_dict(inputs['state'])
model.eval()
if mode == 'gamma':
    rules = [(torch.nn.Conv2d, z.Gamma(0.25)), (torch.nn.Linear, z.Gamma(0.05))]
else:
    rules = [(torch.nn.Conv2d, z.Epsilon(1e-6)), (torch.nn.Linear, z.Epsilon(1e-6))]
LayerMapComposite(rules).register(model)
x = inputs['x'].clone().requires_grad_()
y = model(x)
y.backward(inputs['target'])
outputs['relevance'] = (x * x.grad).detach()
outputs['logits'] = y.detach()
'''

_TIMM_SMALL = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=10)


@pytest.mark.parametrize('name, kwargs', [
    ('vit_tiny_patch16_224', dict(img_size=96)),
    ('vit_base_patch16_224', dict(_TIMM_SMALL, qk_norm=True, init_values=0.1, class_token=False,
                                  global_pool='avg')),
], ids=['vit_tiny', 'small_qk_norm_layerscale'])
@pytest.mark.parametrize('mode', ['gamma', 'epsilon'])
def test_timm_vit_matches_lxt_style_oracle(name, kwargs, mode, oracle):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    with torch.no_grad():  # timm zero-initialises the head as well
        torch.nn.init.normal_(model.head.weight, std=model.head.in_features ** -0.5)
    size = model.patch_embed.img_size
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(3))
    target = torch.zeros(2, model.num_classes)
    target[[0, 1], [2, 5]] = 1.
    lxt = oracle.run(_TIMM_ORACLE, mode=mode, name=name, kwargs=kwargs, state=model.state_dict(), x=x,
                         target=target)
    composite = ViTGamma() if mode == 'gamma' else ViTEpsilon()
    output, relevance = _attribute(model, composite, x, target)
    torch.testing.assert_close(output, lxt['logits'], rtol=1e-5, atol=1e-5)
    assert_rel_close(relevance, lxt['relevance'], 1e-3)


# --- the missing-oracle policy itself (conftest.require): no oracle needed -----------------------

@pytest.mark.parametrize('ci', [False, True], ids=['local', 'ci'])
def test_missing_oracle_is_a_skip_locally_and_a_failure_in_ci(ci, monkeypatch, tmp_path):
    monkeypatch.setattr(lxt_oracle, 'ORACLE_PATH', str(tmp_path / 'no-oracle'))
    monkeypatch.setattr(conftest, 'IN_CI', ci)
    outcome = pytest.fail.Exception if ci else pytest.skip.Exception
    with pytest.raises(outcome, match='oracle environment missing'):
        conftest.require_oracle()
    with pytest.raises(outcome, match='lxt_ext_no_such_module is not installed'):
        conftest.require_module('lxt_ext_no_such_module')


def test_a_broken_install_is_an_error_not_a_skip(monkeypatch, tmp_path):
    (tmp_path / 'lxt_ext_broken_module').mkdir()
    (tmp_path / 'lxt_ext_broken_module' / '__init__.py').write_text("raise ImportError('broken install')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(conftest, 'IN_CI', False)
    with pytest.raises(ImportError, match='broken install'):
        conftest.require_module('lxt_ext_broken_module')
