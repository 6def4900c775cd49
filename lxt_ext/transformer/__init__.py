"""Attention-aware LRP for transformers, in the Gradient x Input convention.

There the gradient ``g_t`` of a tensor ``t`` carries relevance per unit of ``t``: ``R_t = t * g_t``, so
linear operations (residual adds, concatenation, reshapes, position embeddings) propagate relevance
exactly under plain autograd, and rules change only the backward of the rest:

- ``convention``: how zennit's rules and lxt_ext's explicit rules run here, the first layer's form, and
  Linear maps called functionally (``linear_rule_apply``);
- ``elementwise``: the identity rule on activations, the uniform rule on products, dropout off;
- ``norms``: LayerNorm / RMSNorm with the std held constant;
- ``linear``: epsilon from the kept output (``OutputEpsilon``);
- ``composites``: ``TransformerComposite``, ``ViTEpsilon``, ``ViTGamma``, ``LanguageTransformer``.

Attention itself is ``lxt_ext.attention``; which module gets which rule is ``lxt_ext.models``.
"""
from .convention import (ExplicitConvention, ExplicitRelevance, ZennitRule, emitting_relevance, gradient_x_input,
                         linear_rule_apply)
from .elementwise import ActivationIdentity, DropoutOff, identity_rule, uniform_product
from .linear import OutputEpsilon
from .norms import NormIdentity, layer_norm_identity, rms_norm_identity
from .composites import LanguageTransformer, TransformerComposite, UnmappedModuleError, ViTEpsilon, ViTGamma

__all__ = [
    'ActivationIdentity', 'DropoutOff', 'NormIdentity', 'OutputEpsilon', 'ZennitRule', 'ExplicitRelevance',
    'ExplicitConvention', 'identity_rule', 'uniform_product', 'layer_norm_identity', 'rms_norm_identity',
    'gradient_x_input', 'emitting_relevance', 'linear_rule_apply',
    'TransformerComposite', 'ViTEpsilon', 'ViTGamma', 'LanguageTransformer', 'UnmappedModuleError',
]
