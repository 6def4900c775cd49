"""lxt_ext's attention-aware composites (Gradient x Input convention) for ViTs and text transformers.

A module gets, in this order: the user's ``layer_map`` rule, then the rule of lxt_ext's model tables
(``lxt_ext.models``: torch.nn's built-in layers, transformers, timm): Linear and convolutions the
composite's rule templates, element-wise activations the identity rule, LayerNorm/RMSNorm the
identity rule on the normalisation, dropout none (off), attention AttnLRP or CP-LRP. Every rule runs
in the Gradient x Input convention (``lxt_ext.transformer``). With ``explicit_first``, the
first Linear/convolution (the one consuming the input) emits relevance, so
``zennit.attribution.Gradient`` returns relevance, ready for ``lxt_ext.visualization``. Every operation
outside the modules with rules gets its rule from ``lxt_ext.operations``, or is refused at the forward, by name,
before any relevance is returned.
"""
import torch
from zennit.core import Composite
from zennit.types import Linear

from .. import models
from .._docstrings import shared_parameters
from ..batch_norm_fold import BatchNormFolding
from ..errors import UnmappedModuleError
from ..operations import OperationRules
from ..rules import Epsilon, Gamma
from ..transformer.elementwise import INPUT_STABILIZER
from ..transformer.convention import OutputRelevance, emitting_relevance, gradient_x_input
from ..transformer.linear import OutputEpsilon

__all__ = ['TransformerComposite', 'ViTEpsilon', 'ViTGamma', 'LanguageTransformer', 'UnmappedModuleError']


@shared_parameters('attention', 'first_rule', 'layer_map', 'canonizers', 'strict', 'input_stabilizer', 'tables')
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
                 layer_map=None, canonizers=None, strict=True, input_stabilizer=INPUT_STABILIZER, tables=True):
        self.options = models.Options(
            attention=attention, input_stabilizer=input_stabilizer, linear=gradient_x_input(linear_rule),
            conv=gradient_x_input(linear_rule if conv_rule is None else conv_rule))
        self.explicit_first = explicit_first
        self.first_rule = None if first_rule is None else gradient_x_input(first_rule)
        self.layer_map = [(types, gradient_x_input(rule, input_stabilizer)) for types, rule in (layer_map or [])]
        self.strict = strict
        self.tables = tables
        super().__init__(module_map=self.mapping, canonizers=canonizers)

    def register(self, module):
        super().register(module)
        # every operation outside the modules with rules: its rule, or a refusal at the forward
        options = self.options
        operations = OperationRules(options.attention, options.linear, options.conv, options.input_stabilizer,
                                    self.strict)
        # the seed at the model's output is relevance (zennit's convention), not a gradient
        output = OutputRelevance(options.input_stabilizer)
        for hook in (operations, output):
            self.hook_refs.add(hook)
            # removed first (the last one first): each wraps the forward the ones before it swapped
            self.handles.insert(0, hook.register(module))

    def mapping(self, ctx, name, module):
        if any(name.startswith(prefix) for prefix in ctx.get('covered', ())):
            return None  # inside a module whose rule computes its children functionally
        first = self.explicit_first and not ctx.get('first_visited') and isinstance(module, Linear)
        if first:
            ctx['first_visited'] = True
        rule = (self.first_rule if first else None) or self._rule(module)
        if first and rule is None:  # module tables off: the composite's own rule for the first layer
            rule = self.options.linear if isinstance(module, torch.nn.Linear) else self.options.conv
        if getattr(rule, 'covers_children', False):
            ctx.setdefault('covered', []).append(f'{name}.')
        return emitting_relevance(rule) if first else rule

    def _rule(self, module):
        rule = next((rule for types, rule in self.layer_map if isinstance(module, types)), None)
        if rule is None and self.tables:
            rule = models.rule_for(module, self.options)
            rule = None if rule is None else gradient_x_input(rule, self.options.input_stabilizer)
        return rule


@shared_parameters('attention', 'first_rule', 'layer_map', 'canonizers', 'strict', 'tables')
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
                 strict=True, tables=True):
        super().__init__(OutputEpsilon(epsilon), conv_rule=Epsilon(epsilon), attention=attention, explicit_first=True,
                         first_rule=first_rule, layer_map=layer_map, canonizers=canonizers, strict=strict,
                         tables=tables)


@shared_parameters('attention', 'first_rule', 'layer_map', 'canonizers', 'strict', 'tables')
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
                 layer_map=None, canonizers=None, strict=True, tables=True):
        super().__init__(Gamma(linear_gamma, stabilizer), conv_rule=Gamma(conv_gamma, stabilizer), attention=attention,
                         explicit_first=True, first_rule=first_rule, layer_map=layer_map, canonizers=canonizers,
                         strict=strict, tables=tables)


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
        Operations on the relevance path without a rule raise at the forward (else warn).
    tables : bool
        Modules get the rules of lxt_ext's model tables (else: every operation its rule from
        ``lxt_ext.operations``).
    """

    def __init__(self, attention='attnlrp', epsilon=0.0, gamma=None, stabilizer=1e-6, layer_map=None, strict=True,
                 tables=True):
        if gamma is not None:
            linear, conv = Gamma(gamma, stabilizer), None
        elif epsilon < 0:
            raise ValueError(f'epsilon must be >= 0, got {epsilon}')
        else:
            linear, conv = (OutputEpsilon(epsilon), Epsilon(epsilon)) if epsilon > 0 else (models.KeepGradient(), None)
        super().__init__(linear, conv_rule=conv, attention=attention, layer_map=layer_map, strict=strict,
                         tables=tables)
