"""transformers' model heads and layers with functional operations: RoBERTa-style heads (a functional
``tanh`` or ``gelu``), Gemma 2's final-logit softcap, GPT-2's ``Conv1D``.
"""
import sys

import torch

from ..._docstrings import shared_parameters
from ...core import ConfigViewRule, SwappedForward
from ...transformer.convention import linear_rule_apply
from ...transformer.elementwise import INPUT_STABILIZER, identity_rule
from ...errors import NotExplainableError

__all__ = ['TanhClassificationHead', 'GeluLMHead', 'FinalLogitSoftcap', 'Conv1DRule']


@shared_parameters('input_stabilizer')
class TanhClassificationHead(SwappedForward):
    """RoBERTa's (XLM-RoBERTa's, CamemBERT's, Data2VecText's) classification head
    ``out_proj(tanh(dense(x[:, 0])))``, whose ``tanh`` is functional: the identity rule on it; ``dense``
    and ``out_proj`` under their own rules, dropout off."""

    def __init__(self, input_stabilizer=INPUT_STABILIZER):
        super().__init__()
        self.input_stabilizer = input_stabilizer

    def apply(self, module, original, features, args, kwargs):
        x = module.dense(module.dropout(features[:, 0, :]))
        return module.out_proj(module.dropout(identity_rule(torch.tanh, x, self.input_stabilizer)))


@shared_parameters('input_stabilizer')
class GeluLMHead(SwappedForward):
    """RoBERTa's (XLM-RoBERTa's, CamemBERT's, Data2VecText's) masked-LM head ``decoder(layer_norm(gelu(dense(x))))``,
    whose ``gelu`` is a module-level function of its modeling file: the identity rule on it; ``dense``,
    ``layer_norm`` and ``decoder`` under their own rules."""

    def __init__(self, input_stabilizer=INPUT_STABILIZER):
        super().__init__()
        self.input_stabilizer = input_stabilizer

    def apply(self, module, original, features, args, kwargs):
        gelu = sys.modules[type(module).__module__].gelu
        x = identity_rule(gelu, module.dense(features), self.input_stabilizer)
        return module.decoder(module.layer_norm(x))


@shared_parameters('input_stabilizer')
class FinalLogitSoftcap(ConfigViewRule):
    """Gemma 2's (and Gemma 3's, when set) final-logit softcap ``c tanh(z / c)``, computed functionally
    in the model's forward: the identity rule on it (a monotone element-wise map: the relevance of
    each capped logit goes to the logit it was computed from). While registered the model computes
    uncapped logits (its config view has no softcap) and its forward, wrapped, caps them with the rule (a
    wrapped forward rather than a hook, so that the composite's output convention applies after the cap).
    A ``labels`` loss would then be of the uncapped logits: it is refused."""

    def __init__(self, input_stabilizer=INPUT_STABILIZER):
        super().__init__()
        self.input_stabilizer = input_stabilizer

    def overrides(self, config):
        return {'final_logit_softcapping': None}

    def attach(self, module):
        super().attach(module)
        cap = float(module.config._lxt_ext_config.final_logit_softcapping)
        hook = self

        def softcap(logits):  # transformers' own order of operations, so the forward is bitwise the same
            return torch.tanh(logits / cap) * cap

        inner = module.forward

        def capped(*args, **kwargs):
            output = inner(*args, **kwargs)
            if not hasattr(output, 'logits'):
                raise TypeError(f'{type(module).__name__}: lxt_ext\'s final-logit softcap rule needs return_dict=True')
            if output.get('loss') is not None:
                raise NotExplainableError(
                    f'{type(module).__name__}: while lxt_ext holds its final-logit softcap the loss would be of the '
                    f'uncapped logits; call the model without labels')
            logits = output.logits
            output.logits = (identity_rule(softcap, logits, hook.input_stabilizer)
                             if hook.wants_relevance(logits) else softcap(logits))
            return output

        self.swap_forward(module, capped)



@shared_parameters('linear_rule')
class Conv1DRule(SwappedForward):
    """transformers' ``Conv1D`` (GPT-2): ``y = x W + b`` with ``W`` of shape (in, out), i.e. a Linear
    layer with weight ``W^T``, under the composite's Linear rule."""

    def __init__(self, linear_rule):
        super().__init__()
        self.linear_rule = linear_rule

    def apply(self, module, original, input, args, kwargs):
        return linear_rule_apply(self.linear_rule, input, module.weight.t(), module.bias)
