"""lxt_ext's attention-aware composites (Gradient x Input convention) for ViTs and text transformers.

A module gets, in this order: the user's ``layer_map`` rule, then the rule of lxt_ext's model tables
(``lxt_ext.models``: torch.nn's built-in layers, transformers, timm): Linear and convolutions the
composite's rule templates, element-wise activations the identity rule, LayerNorm/RMSNorm the
identity rule on the normalisation, dropout none (off), attention AttnLRP or CP-LRP. Every rule runs
in the Gradient x Input convention (``lxt_ext.transformer``). With ``explicit_first``, the
first Linear/convolution (the one consuming the input) emits relevance, so
``zennit.attribution.Gradient`` returns relevance, ready for ``lxt_ext.visualization``. Leaf modules
that get no rule are reported by name (an error with ``strict``, a warning otherwise).
"""
import warnings

from zennit.core import Composite
from zennit.types import Linear

from .. import models
from .._docstrings import shared_parameters
from ..batch_norm_fold import BatchNormFolding
from ..rules import Epsilon, Gamma
from ..transformer.elementwise import INPUT_STABILIZER
from ..transformer.convention import OutputRelevance, emitting_relevance, gradient_x_input
from ..transformer.linear import OutputEpsilon

__all__ = ['TransformerComposite', 'ViTEpsilon', 'ViTGamma', 'LanguageTransformer', 'UnmappedModuleError']


class UnmappedModuleError(TypeError):
    """Leaf modules the composite has no rule for (their plain gradient would be wrong relevance)."""


@shared_parameters('attention', 'first_rule', 'layer_map', 'canonizers', 'strict', 'input_stabilizer')
class TransformerComposite(BatchNormFolding, Composite):
    """A zennit Composite of Gradient x Input rules for transformers.

    Parameters
    ----------
    linear_rule : zennit.core.Hook
        The rule template for Linear layers: an lxt_ext fused rule (any convention: the composite sets its own)
        or a zennit ``BasicHook`` rule.
    conv_rule : zennit.core.Hook, optional
        The rule template for convolutions (default: ``linear_rule``).
    explicit_first : bool, optional
        The first Linear/convolution emits relevance (default False).
    """

    def __init__(self, linear_rule, conv_rule=None, attention='attnlrp', explicit_first=False, first_rule=None,
                 layer_map=None, canonizers=None, strict=True, input_stabilizer=INPUT_STABILIZER):
        self.options = models.Options(
            attention=attention, input_stabilizer=input_stabilizer, linear=gradient_x_input(linear_rule),
            conv=gradient_x_input(linear_rule if conv_rule is None else conv_rule))
        self.explicit_first = explicit_first
        self.first_rule = None if first_rule is None else gradient_x_input(first_rule)
        self.layer_map = [(types, gradient_x_input(rule, input_stabilizer)) for types, rule in (layer_map or [])]
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
                       f'register an adapter in lxt_ext.models (models.KeepGradient() for modules that are '
                       f'linear or off the relevance path).')
            if self.strict:
                self.remove()
                raise UnmappedModuleError(message)
            warnings.warn(message)
        # the seed at the model's output is relevance (zennit's convention), not a gradient
        output = OutputRelevance(self.options.input_stabilizer)
        self.hook_refs.add(output)
        # removed first: it wraps the forward a rule on the model itself may have swapped
        self.handles.insert(0, output.register(module))

    def mapping(self, ctx, name, module):
        if any(name.startswith(prefix) for prefix in ctx.get('covered', ())):
            return None  # inside a module whose rule computes its children functionally
        first = self.explicit_first and not ctx.get('first_visited') and isinstance(module, Linear)
        if first:
            ctx['first_visited'] = True
        rule = (self.first_rule if first else None) or self._rule(module)
        if getattr(rule, 'covers_children', False):
            ctx.setdefault('covered', []).append(f'{name}.')
        if rule is None and next(module.children(), None) is None:
            self._unmapped.append((name, module))
        return emitting_relevance(rule) if first else rule

    def _rule(self, module):
        rule = next((rule for types, rule in self.layer_map if isinstance(module, types)), None)
        if rule is None:
            rule = models.rule_for(module, self.options)
            rule = None if rule is None else gradient_x_input(rule, self.options.input_stabilizer)
        return rule


@shared_parameters('attention', 'first_rule', 'layer_map', 'canonizers', 'strict')
class ViTEpsilon(TransformerComposite):
    """Vision Transformers: epsilon on every Linear (``OutputEpsilon``: from the layer output, which
    the next rule keeps anyway) and fused epsilon on convolutions, AttnLRP (or CP-LRP) in attention;
    the patch embedding (the first layer) emits relevance (``first_rule`` replaces its rule, e.g.
    zennit's ``Flat`` or ``ZBox``).

    Parameters
    ----------
    epsilon : float, optional
        The epsilon of every Linear and convolution (default 1e-6).
    """

    def __init__(self, epsilon=1e-6, attention='attnlrp', first_rule=None, layer_map=None, canonizers=None,
                 strict=True):
        super().__init__(OutputEpsilon(epsilon), conv_rule=Epsilon(epsilon), attention=attention, explicit_first=True,
                         first_rule=first_rule, layer_map=layer_map, canonizers=canonizers, strict=strict)


@shared_parameters('attention', 'first_rule', 'layer_map', 'canonizers', 'strict')
class ViTGamma(TransformerComposite):
    """The published LXT recipe for Vision Transformers: fused gamma 0.25 on convolutions (the patch
    embedding, which emits relevance), 0.05 on every Linear (attention projections included),
    CP-LRP in attention (``attention='cp'``, the default here).

    Parameters
    ----------
    conv_gamma : float, optional
        The gamma of the convolutions (default 0.25).
    linear_gamma : float, optional
        The gamma of the Linear layers (default 0.05).
    stabilizer : float, optional
        The gamma rules' stabilizer (default 1e-6).
    """

    def __init__(self, conv_gamma=0.25, linear_gamma=0.05, stabilizer=1e-6, attention='cp', first_rule=None,
                 layer_map=None, canonizers=None, strict=True):
        super().__init__(Gamma(linear_gamma, stabilizer), conv_rule=Gamma(conv_gamma, stabilizer), attention=attention,
                         explicit_first=True, first_rule=first_rule, layer_map=layer_map, canonizers=canonizers,
                         strict=strict)


class LanguageTransformer(TransformerComposite):
    """Text transformers explained w.r.t. their input embeddings (relevance ``x * g``): AttnLRP or
    CP-LRP in attention; on every Linear layer epsilon, or fused gamma where ``gamma`` is given.

    ``epsilon=0`` (the default, LXT's efficient recipe): LRP-epsilon with epsilon -> 0 is the plain gradient
    in this convention (``y / stab(y) = 1``), so Linear layers and convolutions get no rule and cost nothing
    beyond plain backward; ``epsilon > 0``: ``OutputEpsilon`` (from the kept layer output, as in ViTEpsilon)
    and fused epsilon on convolutions.

    Parameters
    ----------
    attention : {'attnlrp', 'cp'}
        The attention rule.
    epsilon : float
        Epsilon of the Linear layers (>= 0), unless ``gamma`` is given.
    gamma : float, optional
        Gamma of the fused gamma rule on every Linear layer instead of epsilon.
    stabilizer : float
        The gamma rule's stabilizer.
    layer_map : list of (type, rule), optional
        zennit-style rules tried first.
    strict : bool
        Leaf modules without a rule raise (else warn).
    """

    def __init__(self, attention='attnlrp', epsilon=0.0, gamma=None, stabilizer=1e-6, layer_map=None, strict=True):
        if gamma is not None:
            linear, conv = Gamma(gamma, stabilizer), None
        elif epsilon < 0:
            raise ValueError(f'epsilon must be >= 0, got {epsilon}')
        else:
            linear, conv = (OutputEpsilon(epsilon), Epsilon(epsilon)) if epsilon > 0 else (models.KeepGradient(), None)
        super().__init__(linear, conv_rule=conv, attention=attention, layer_map=layer_map, strict=strict)
