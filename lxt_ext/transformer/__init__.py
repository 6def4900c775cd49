"""The Gradient x Input rules of lxt_ext's transformer composites.

There the gradient ``g_t`` of a tensor ``t`` carries relevance per unit of ``t``: ``R_t = t * g_t``, so
linear operations (residual adds, concatenation, reshapes, position embeddings) propagate relevance
exactly under plain autograd, and rules change only the backward of the rest:

- ``convention``: how zennit's rules and lxt_ext's explicit rules run here, the first layer's form, the
  model output's (``OutputRelevance``: the seed there is relevance), Linear maps called functionally;
- ``elementwise``: the identity rule on activations, the uniform rule on products, dropout off;
- ``norms``: LayerNorm / RMSNorm with the std held constant;
- ``linear``: epsilon from the kept output (``OutputEpsilon``);
- ``convolution``: convolutions in a module's own forward (``OwnForwardConvolution``);
- ``mlp``: gated MLPs (uniform rule on the product, or the gate constant);
- ``experts``: mixture-of-experts rules with the routing held constant;
- ``ssm``: MambaLRP's rule on a Mamba mixer's scan (its coefficients held constant).

Rules on single tensor operations belong here too. Attention is ``lxt_ext.attention``; which module gets
which rule is ``lxt_ext.models``; the composites are ``lxt_ext.composites``.
"""
from .convention import (ExplicitConvention, ExplicitRelevance, OutputRelevance, ZennitRule, emitting_relevance,
                         gradient_x_input, linear_rule_apply, relevance_seeded)
from .convolution import OwnForwardConvolution
from .elementwise import INPUT_STABILIZER, ActivationIdentity, DropoutOff, identity_rule, uniform_product
from .experts import DenseExperts, RouterConstant
from .linear import OutputEpsilon
from .mlp import FusedGatedMLP, GatedMLP, gated_product
from .ssm import SelectiveSSM
from .norms import (NormIdentity, functional_rms_norm_identity, group_norm_identity, layer_norm_identity,
                    rms_norm_identity)

__all__ = [
    'ActivationIdentity', 'DropoutOff', 'OwnForwardConvolution', 'NormIdentity', 'OutputEpsilon', 'ZennitRule', 'ExplicitRelevance',
    'ExplicitConvention', 'OutputRelevance', 'identity_rule', 'uniform_product', 'layer_norm_identity', 'group_norm_identity',
    'functional_rms_norm_identity',
    'rms_norm_identity', 'gradient_x_input', 'emitting_relevance', 'linear_rule_apply', 'relevance_seeded',
    'INPUT_STABILIZER', 'GatedMLP', 'FusedGatedMLP', 'gated_product', 'DenseExperts', 'RouterConstant',
    'SelectiveSSM',
]
