"""lxt_ext's attention-aware composites (Gradient x Input convention) for ViTs and text transformers.

A module gets, in this order: the user's ``layer_map`` rule, the per-architecture table's
(``lxt_ext.adapters``), then the built-in rule of its type: Linear and convolutions the composite's
fused rule, element-wise activations the identity rule, LayerNorm/RMSNorm the identity rule on the
normalisation, dropout none (off), ``nn.MultiheadAttention`` AttnLRP or CP-LRP. Every rule runs in
the Gradient x Input convention (lxt_ext's fused rules with ``convention='gradient_x_input'``,
zennit's rules adapted per hook). With ``explicit_first``, the first Linear/convolution (the one
consuming the input) emits relevance, so ``zennit.attribution.Gradient`` returns relevance ready
for ``zennit.image.imgify``. Leaf modules that get no rule and are not known to be safe under the
plain gradient are reported by name (an error with ``strict``, a warning otherwise).
"""
import warnings

import torch
from zennit.composites import register_composite
from zennit.core import Composite
from zennit.types import Convolution

from . import adapters
from .rules import Epsilon, FusedRule, Gamma
from .transformer_rules import (ActivationIdentity, DropoutOff, ExplicitConvention, ExplicitRelevance,
                                MultiheadAttentionRule, NormIdentity, OutputEpsilon, ZennitRule, gradient_x_input)

__all__ = ['TransformerComposite', 'ViTEpsilon', 'ViTGamma', 'LanguageTransformer', 'UnmappedModuleError']

ELEMENTWISE_ACTIVATIONS = (
    torch.nn.GELU, torch.nn.SiLU, torch.nn.ReLU, torch.nn.ReLU6, torch.nn.LeakyReLU, torch.nn.ELU, torch.nn.SELU,
    torch.nn.CELU, torch.nn.Tanh, torch.nn.Sigmoid, torch.nn.Mish, torch.nn.Softplus, torch.nn.Hardswish,
    torch.nn.Hardsigmoid, torch.nn.Hardtanh,
)
NORMS = (torch.nn.LayerNorm, torch.nn.RMSNorm)
DROPOUTS = (torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d, torch.nn.AlphaDropout)
# Leaves whose plain gradient is already right in the Gradient x Input convention: linear in their
# relevance-carrying input, or off the relevance path.
SAFE_LEAVES = (torch.nn.Identity, torch.nn.Flatten, torch.nn.Unflatten, torch.nn.Embedding)
_PRODUCTS = (torch.nn.Linear, Convolution)


class UnmappedModuleError(TypeError):
    """Leaf modules the composite has no rule for (their plain gradient would be wrong relevance)."""


def _explicit(rule):
    """``rule`` emitting explicit relevance ``R_in`` instead of ``g_in`` (the first layer)."""
    if isinstance(rule, ZennitRule):
        return ZennitRule(rule.rule, explicit_output=True, epsilon=rule.epsilon)
    if isinstance(rule, ExplicitConvention):
        return ExplicitConvention(rule.rule, explicit_output=True, epsilon=rule.epsilon)
    if isinstance(rule, (FusedRule, OutputEpsilon)):
        return ExplicitRelevance(rule)
    raise TypeError(f'the first layer needs an lxt_ext or zennit rule for Linear/convolutions, not '
                    f'{type(rule).__name__}')


class TransformerComposite(Composite):
    """A zennit Composite of Gradient x Input rules for transformers.

    ``linear_rule`` (and ``conv_rule``, default: ``linear_rule``) are rule templates for Linear
    layers and convolutions: lxt_ext fused rules (any convention: the composite sets its own) or
    zennit BasicHook rules. ``attention``: ``'attnlrp'`` or ``'cp'``. ``explicit_first``: the first
    Linear/convolution emits relevance (``first_rule`` replaces its rule). ``layer_map``: zennit-style
    ``[(types, rule), ...]`` tried first. ``strict``: unmapped leaf modules raise (else warn)."""

    def __init__(self, linear_rule, conv_rule=None, attention='attnlrp', explicit_first=False, first_rule=None,
                 layer_map=None, canonizers=None, strict=True, epsilon=1e-10):
        self.options = adapters.Options(attention=attention, epsilon=epsilon, linear=gradient_x_input(linear_rule))
        self.conv_rule = gradient_x_input(linear_rule if conv_rule is None else conv_rule)
        self.explicit_first = explicit_first
        self.first_rule = None if first_rule is None else gradient_x_input(first_rule)
        self.layer_map = [(types, gradient_x_input(rule, epsilon)) for types, rule in (layer_map or [])]
        self.strict = strict
        self._unmapped = []
        super().__init__(module_map=self.mapping, canonizers=canonizers)

    def register(self, module):
        self._unmapped = []
        super().register(module)
        if self._unmapped:
            listing = ', '.join(f'{name} ({type(child).__module__}.{type(child).__qualname__})'
                                for name, child in self._unmapped)
            message = (f'{type(self).__name__} has no rule for these modules, so their plain gradient would '
                       f'propagate wrong relevance: {listing}. Map them with layer_map=[(type, rule)], or '
                       f'register an adapter in lxt_ext.adapters (adapters.KeepGradient() for modules that are '
                       f'linear or off the relevance path).')
            if self.strict:
                self.remove()
                raise UnmappedModuleError(message)
            warnings.warn(message)

    def mapping(self, ctx, name, module):
        if any(name.startswith(prefix) for prefix in ctx.get('covered', ())):
            return None  # inside a module whose rule computes its children functionally
        first = self.explicit_first and not ctx.get('first_visited') and isinstance(module, _PRODUCTS)
        if first:
            ctx['first_visited'] = True
        rule = (self.first_rule if first else None) or self._rule(module)
        if isinstance(rule, MultiheadAttentionRule):
            ctx.setdefault('covered', []).append(f'{name}.')
        if rule is None and next(module.children(), None) is None and not isinstance(module, SAFE_LEAVES):
            self._unmapped.append((name, module))
        return _explicit(rule) if first else rule

    def _rule(self, module):
        rule = next((rule for types, rule in self.layer_map if isinstance(module, types)), None)
        if rule is None:
            rule = adapters.rule_for(module, self.options)
            rule = None if rule is None else gradient_x_input(rule, self.options.epsilon)
        return rule if rule is not None else self._builtin(module)

    def _builtin(self, module):
        if isinstance(module, torch.nn.MultiheadAttention):
            return MultiheadAttentionRule(self.options.attention, self.options.linear)
        if isinstance(module, torch.nn.Linear):
            return self.options.linear
        if isinstance(module, Convolution):
            return self.conv_rule
        if isinstance(module, ELEMENTWISE_ACTIVATIONS):
            return ActivationIdentity(self.options.epsilon)
        if isinstance(module, NORMS):
            return NormIdentity()
        if isinstance(module, DROPOUTS):
            return DropoutOff()
        return None


@register_composite('lxt_ext_vit_epsilon')
class ViTEpsilon(TransformerComposite):
    """Vision Transformers: epsilon on every Linear (``OutputEpsilon``: from the layer output, which
    the next rule keeps anyway) and fused epsilon on convolutions, AttnLRP (or CP-LRP) in attention;
    the patch embedding (the first layer) emits relevance (``first_rule`` replaces its rule, e.g.
    zennit's ``Flat`` or ``ZBox``)."""

    def __init__(self, epsilon=1e-6, attention='attnlrp', first_rule=None, layer_map=None, canonizers=None,
                 strict=True):
        super().__init__(OutputEpsilon(epsilon), conv_rule=Epsilon(epsilon), attention=attention, explicit_first=True,
                         first_rule=first_rule, layer_map=layer_map, canonizers=canonizers, strict=strict)


@register_composite('lxt_ext_vit_gamma')
class ViTGamma(TransformerComposite):
    """The published LXT recipe for Vision Transformers: fused gamma 0.25 on convolutions (the patch
    embedding, which emits relevance), 0.05 on every Linear (attention projections included),
    CP-LRP in attention."""

    def __init__(self, conv_gamma=0.25, linear_gamma=0.05, stabilizer=1e-6, attention='cp', first_rule=None,
                 layer_map=None, canonizers=None, strict=True):
        super().__init__(Gamma(linear_gamma, stabilizer), conv_rule=Gamma(conv_gamma, stabilizer), attention=attention,
                         explicit_first=True, first_rule=first_rule, layer_map=layer_map, canonizers=canonizers,
                         strict=strict)


@register_composite('lxt_ext_language_transformer')
class LanguageTransformer(TransformerComposite):
    """Text transformers explained w.r.t. their input embeddings (relevance ``x * g``): fused epsilon
    (``linear_rule='epsilon'``) or gamma on every Linear, AttnLRP or CP-LRP in attention."""

    def __init__(self, attention='attnlrp', linear_rule='epsilon', epsilon=1e-6, gamma=0.25, layer_map=None,
                 strict=True):
        rules = {'epsilon': lambda: Epsilon(epsilon), 'gamma': lambda: Gamma(gamma, epsilon)}
        if linear_rule not in rules:
            raise ValueError(f"linear_rule must be 'epsilon' or 'gamma', got {linear_rule!r}")
        super().__init__(rules[linear_rule](), attention=attention, layer_map=layer_map, strict=strict)
