"""Moved: the transformer rules live in ``lxt_ext.transformer`` (and ``MultiheadAttentionRule`` in
``lxt_ext.models.torch_nn``); this module keeps the old imports working."""
from .models.torch_nn import MultiheadAttentionRule
from .transformer.convention import (ExplicitConvention, ExplicitRelevance, ZennitRule, gradient_x_input,
                                     linear_rule_apply)
from .transformer.elementwise import ActivationIdentity, DropoutOff, identity_rule, uniform_product
from .transformer.linear import OutputEpsilon
from .transformer.norms import NormIdentity, layer_norm_identity, rms_norm_identity

__all__ = [
    'ActivationIdentity', 'NormIdentity', 'DropoutOff', 'OutputEpsilon', 'ZennitRule', 'ExplicitRelevance',
    'ExplicitConvention', 'MultiheadAttentionRule',
    'identity_rule', 'layer_norm_identity', 'rms_norm_identity', 'uniform_product', 'linear_rule_apply',
    'gradient_x_input',
]
