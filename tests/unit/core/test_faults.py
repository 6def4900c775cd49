"""Faults inside an attribution leave the model exactly as it was before it.

An exception raised in the forward or the backward pass of an attribution (a target of the wrong
shape, a user's forward or forward hook that raises, a KeyboardInterrupt in forward or in backward)
must not leave anything of lxt_ext (or of zennit's canonizers) on the model. The oracle is the
model's own state taken before the attribution, never lxt_ext:

- plain outputs and plain gradients (w.r.t. the input and every trainable parameter), bitwise;
- the state_dict bitwise, the same Parameter and buffer objects over the same storage, ``.grad``
  untouched;
- every module's ``vars()`` as before: no ``forward`` or ``_lxt_ext_rule`` entry added (a user's own
  instance-level ``forward`` is the same object again), the same children (no canonizer ``Sum``
  left), the same hooks in every hook dict, the same ``config`` object (Hugging Face attention),
  ``training`` as it was; parameters' ``requires_grad`` as they were; no global module hooks.

Some modules are put in training mode and some parameters are frozen first, so that a reset to
defaults would show. Each case also attributes once before the fault and once after it with the same
composite instance: the two relevances must be bitwise equal (the composite is reusable after a fault).

Models: resnet18 under ``EpsilonGammaBox`` with zennit's ``ResNetCanonizer`` (which merges BatchNorms
and swaps the blocks' forward), a tiny torchvision ViT under ``ViTEpsilon`` and ``ViTGamma``, a tiny
LLaMA under ``LanguageTransformer``; attributed as users do: ``with Gradient(model, composite)``,
``with composite.context(model)`` and ``with Explainer(model, composite)``.
"""
import copy

import pytest
import torch
from zennit.attribution import Gradient
from zennit.canonizers import Canonizer
from zennit.torchvision import ResNetCanonizer

from conftest import EmbedsToLogits, randomize_batch_norms, require_module
from support import Snapshot, no_lxt_ext_left, seed_for
from lxt_ext.attribution import Explainer
from lxt_ext.composites import EpsilonGammaBox, LanguageTransformer, ViTEpsilon, ViTGamma

torchvision = require_module('torchvision')
transformers = require_module('transformers')

FAULTS = ('target_shape', 'hook_raises', 'forward_raises', 'interrupt_forward', 'interrupt_backward')
EXPECTED = {'target_shape': (RuntimeError, ValueError), 'hook_raises': ValueError, 'forward_raises': ValueError,
            'interrupt_forward': KeyboardInterrupt, 'interrupt_backward': KeyboardInterrupt}


def _first_tensor(value):
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


class Faults:
    """The user's code on the model, installed before the snapshot and armed for one attribution only:
    a forward hook on ``hooked`` (raises ValueError, raises KeyboardInterrupt, or puts a tensor hook raising
    KeyboardInterrupt on its output, so that backward is interrupted there) and an instance-level
    ``forward`` wrapper on ``wrapped`` that raises ValueError after the module's own forward (inside the
    autograd Function of the module's rule)."""

    def __init__(self, hooked, wrapped):
        self.kind = None
        self.fired = False
        self.handle = hooked.register_forward_hook(self._forward_hook)
        plain = wrapped.forward

        def forward(*args, **kwargs):
            output = plain(*args, **kwargs)
            if self.kind == 'forward_raises':
                self.fired = True
                raise ValueError('a user forward raising midway')
            return output
        wrapped.forward = forward
        self.wrapped, self.wrapper = wrapped, forward

    def _forward_hook(self, module, args, output):
        if self.kind == 'hook_raises':
            self.fired = True
            raise ValueError('a user forward hook raising midway')
        if self.kind == 'interrupt_forward':
            self.fired = True
            raise KeyboardInterrupt('interrupted in forward')
        if self.kind == 'interrupt_backward':
            tensor = _first_tensor(output)
            if tensor is not None and tensor.requires_grad:
                tensor.register_hook(self._interrupt)

    def _interrupt(self, grad):
        self.fired = True
        raise KeyboardInterrupt('interrupted in backward')


# ---------------------------------------------------------------------------------------------- models

def build_cnn():
    torch.manual_seed(0)
    model = randomize_batch_norms(torchvision.models.resnet18(num_classes=10), seed=0)
    model.eval()
    for module in (model.fc, model.conv1, model.relu, model.layer2[0].conv2):
        module.train()  # modules whose training flag does not change their forward
    for parameter in (model.conv1.weight, model.layer1[0].bn1.weight, model.fc.bias):
        parameter.requires_grad_(False)
    x = torch.randn(2, 3, 32, 32)
    faults = Faults(hooked=model.layer3, wrapped=model.layer2[0].conv2)
    return model, x, faults


def build_vit():
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                 hidden_dim=32, mlp_dim=64, num_classes=10)
    torch.nn.init.normal_(model.heads.head.weight, std=0.2)  # torchvision zero-initialises it
    torch.nn.init.normal_(model.heads.head.bias, std=0.1)
    model.train()  # dropout p=0: training mode does not change the forward
    model.heads.eval()
    model.encoder.layers[1].ln_1.eval()
    for parameter in (model.class_token, model.encoder.pos_embedding, model.conv_proj.bias,
                      model.encoder.layers[0].mlp[0].weight):
        parameter.requires_grad_(False)
    x = torch.randn(2, 3, 32, 32)
    faults = Faults(hooked=model.encoder.layers[0], wrapped=model.encoder.layers[1].mlp[0])
    return model, x, faults


def build_llama():
    torch.manual_seed(1)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      initializer_range=0.2, rms_norm_eps=1e-6)
    lm = transformers.LlamaForCausalLM(config)
    model = EmbedsToLogits(lm)
    model.train()  # attention_dropout 0: training mode does not change the forward
    lm.lm_head.eval()
    lm.model.norm.eval()
    layers = lm.model.layers
    for parameter in (lm.model.embed_tokens.weight, layers[0].self_attn.q_proj.weight, layers[1].mlp.up_proj.weight,
                      lm.model.norm.weight):
        parameter.requires_grad_(False)
    x = lm.get_input_embeddings()(torch.randint(0, 64, (2, 6))).detach()
    faults = Faults(hooked=layers[0], wrapped=layers[1].mlp.down_proj)
    return model, x, faults


MODELS = {'cnn': build_cnn, 'vit': build_vit, 'llama': build_llama}
COMPOSITES = {
    'cnn': {'EpsilonGammaBox': lambda: EpsilonGammaBox(low=-3., high=3., canonizers=[ResNetCanonizer()])},
    'vit': {'ViTEpsilon': ViTEpsilon, 'ViTGamma': ViTGamma},
    'llama': {'LanguageTransformer': lambda: LanguageTransformer(attention='attnlrp')},
}


# ------------------------------------------------------------------------------------ attributions

def via_gradient(model, composite, x, target):
    with Gradient(model, composite) as attributor:
        _, relevance = attributor(x.clone(), target)
    return relevance


def via_context(model, composite, x, target):
    with composite.context(model) as modified:
        input = x.clone().requires_grad_()
        output = modified(input)
        (relevance,) = torch.autograd.grad(output, input, target)
    return relevance


def via_gradient_x_input(model, composite, x, target):
    with Explainer(model, composite) as attributor:
        _, relevance = attributor(x, target)[:2]
    return relevance


WAYS = {'Gradient': via_gradient, 'context': via_context, 'Explainer': via_gradient_x_input}


CASES = [(family, composite, way) for family, composites in COMPOSITES.items() for composite in composites
         for way in (('Gradient', 'context') if family == 'cnn' else WAYS)]


@pytest.mark.parametrize('fault', FAULTS)
@pytest.mark.parametrize('family, composite_name, way', CASES)
def test_a_fault_leaves_the_model_as_before(family, composite_name, way, fault):
    model, x, faults = MODELS[family]()
    instance_forwards = {name: vars(m)['forward'] for name, m in model.named_modules() if 'forward' in vars(m)}
    assert list(instance_forwards.values()) == [faults.wrapper]  # the user's own, to be kept as it is
    snapshot = Snapshot(model, x)
    composite = COMPOSITES[family][composite_name]()
    attribute = WAYS[way]
    target = seed_for(snapshot.output, torch.Generator().manual_seed(5))

    before = attribute(model, composite, x, target)
    snapshot.assert_same(model, x)

    faults.kind = fault
    wrong = torch.ones(*target.shape[:-1], target.shape[-1] + 1)
    with pytest.raises(EXPECTED[fault]):
        attribute(model, composite, x, wrong if fault == 'target_shape' else target)
    faults.kind = None
    assert fault == 'target_shape' or faults.fired, 'the fault was not injected'

    no_lxt_ext_left(model)
    assert {name: vars(m)['forward'] for name, m in model.named_modules() if 'forward' in vars(m)} == instance_forwards
    snapshot.assert_same(model, x)

    after = attribute(model, composite, x, target)
    assert torch.equal(after, before), 'the composite attributes differently after the fault'
    snapshot.assert_same(model, x)


class Interrupting(Canonizer):
    """A user canonizer after zennit's: KeyboardInterrupt while the composite is being registered."""

    def apply(self, root_module):
        raise KeyboardInterrupt('interrupted while registering')

    def register(self):
        pass

    def remove(self):
        pass

    def copy(self):
        return type(self)()


@pytest.mark.parametrize('family, make', [
    ('cnn', lambda: EpsilonGammaBox(low=-3., high=3., canonizers=[ResNetCanonizer(), Interrupting()])),
    ('vit', lambda: ViTGamma(canonizers=[Interrupting()])),
])
def test_an_interrupted_registration_leaves_the_model_as_before(family, make):
    model, x, faults = MODELS[family]()
    snapshot = Snapshot(model, x)
    composite = make()
    with pytest.raises(KeyboardInterrupt):
        with Gradient(model, composite) as attributor:
            attributor(x.clone(), torch.ones_like(snapshot.output))
    no_lxt_ext_left(model)
    snapshot.assert_same(model, x)


def test_the_snapshot_sees_what_a_fault_could_leave():
    """The oracle can fail: a registered composite, a training flag, a requires_grad flag and a swapped
    config are each reported."""
    model, x, _ = build_llama()
    snapshot = Snapshot(model, x)
    composite = LanguageTransformer()
    composite.register(model)
    with pytest.raises(AssertionError):
        snapshot.assert_same(model, x)
    composite.remove()
    snapshot.assert_same(model, x)
    attention = model.lm.model.layers[0].self_attn
    for change, undo in [(lambda: model.lm.lm_head.train(), lambda: model.lm.lm_head.eval()),
                         (lambda: attention.o_proj.weight.requires_grad_(False),
                          lambda: attention.o_proj.weight.requires_grad_(True)),
                         (lambda: setattr(attention, 'config', copy.copy(attention.config)), None)]:
        config = attention.config
        change()
        with pytest.raises(AssertionError):
            snapshot.assert_same(model, x)
        if undo is None:
            attention.config = config
        else:
            undo()
        snapshot.assert_same(model, x)
