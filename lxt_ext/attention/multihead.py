"""``torch.nn.MultiheadAttention`` under AttnLRP or CP-LRP, its projections under the composite's Linear rule."""
import torch

from .._docstrings import shared_parameters
from ..core import SwappedForward, call_arguments
from ..layers import check_input
from ..ops import attention_mode
from ..ops.masks import additive_from_masked
from ..transformer.convention import gradient_x_input, linear_rule_apply
from .lrp import attention_lrp
from ..errors import NotExplainableError

__all__ = ['MultiheadAttentionRule']


@shared_parameters('attention')
class MultiheadAttentionRule(SwappedForward):
    """``torch.nn.MultiheadAttention`` with its input and output projections (which it calls
    functionally, out of zennit's reach) under ``linear_rule`` (a rule template; None: the plain
    gradient, as in LXT) and the attention under AttnLRP or CP-LRP (``lxt_ext.attention``).

    Supported: batch_first True and False, unbatched input, self-attention and separate
    query/key/value, packed or separate projection weights, ``attn_mask``, ``key_padding_mask``,
    ``is_causal``. With ``need_weights=True`` the returned attention weights are computed apart
    and carry no relevance. Dropout is off. Not supported: ``add_bias_kv``, ``add_zero_attn``.

    Parameters
    ----------
    linear_rule : zennit.core.Hook, optional
        The rule template of the projections (run in the Gradient x Input convention); None: the plain gradient.
    """
    covers_children = True  # the projections are computed here, functionally: the composite maps no child

    def __init__(self, attention='attnlrp', linear_rule=None):
        super().__init__()
        attention_mode(attention)
        self.attention = attention
        self.linear_rule = None if linear_rule is None else gradient_x_input(linear_rule)

    def prepare(self, module):
        if not isinstance(module, torch.nn.MultiheadAttention):
            raise TypeError(f'MultiheadAttentionRule takes nn.MultiheadAttention, not {type(module).__name__}')
        if module.bias_k is not None or module.add_zero_attn:
            raise NotExplainableError(
                'MultiheadAttentionRule does not support add_bias_kv or add_zero_attn; leave this module to another '
                'rule (layer_map) or out of the composite')

    def apply(self, module, original, query, args, kwargs):
        arguments = call_arguments(torch.nn.MultiheadAttention.forward, module, query, *args, **kwargs)
        key, value, key_padding_mask, attn_mask = (arguments[name] for name in
                                                   ('key', 'value', 'key_padding_mask', 'attn_mask'))
        need_weights, average, is_causal = (arguments[name] for name in
                                            ('need_weights', 'average_attn_weights', 'is_causal'))
        check_input(module, query, module.out_proj.weight)
        unbatched = query.dim() == 2
        same_kv, self_attention = key is value, query is key and key is value
        if unbatched:
            query, key, value = query[:, None], key[:, None], value[:, None]
            key_padding_mask = None if key_padding_mask is None else key_padding_mask[None]
        if not module.batch_first or unbatched:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        q, k, v = self._project(module, query, key, value, self_attention, same_kv)
        batch, heads, length = q.shape[0], module.num_heads, q.shape[2]
        mask = self._mask(attn_mask, key_padding_mask, batch, heads, q.dtype)
        causal = bool(is_causal and mask is None)
        output = attention_lrp(q, k, v, mask, is_causal=causal, mode=self.attention)
        output = output.transpose(1, 2).reshape(batch, length, module.embed_dim)
        tap = module._modules.get('heads')  # lxt_ext.concepts.input_taps: the heads' concatenation as a module output
        if tap is not None:
            output = tap(output)
        output = linear_rule_apply(self.linear_rule, output, module.out_proj.weight, module.out_proj.bias)
        if not module.batch_first or unbatched:
            output = output.transpose(0, 1)
        weights = self._weights(q, k, mask, causal, average) if need_weights else None
        if unbatched:
            output, weights = output[:, 0], None if weights is None else weights[0]
        return output, weights

    def _project(self, module, query, key, value, self_attention, same_kv):
        """``(B, H, N, D)`` query, key and value from ``(B, N, E)`` inputs."""
        E, H = module.embed_dim, module.num_heads
        rule, bias = self.linear_rule, module.in_proj_bias
        biases = (None,) * 3 if bias is None else bias.chunk(3)
        if module._qkv_same_embed_dim and self_attention:
            projected = linear_rule_apply(rule, query, module.in_proj_weight, bias).chunk(3, dim=-1)
        elif module._qkv_same_embed_dim:
            weights = module.in_proj_weight.chunk(3)
            q = linear_rule_apply(rule, query, weights[0], biases[0])
            if same_kv:
                k, v = linear_rule_apply(rule, key, module.in_proj_weight[E:], None if bias is None else bias[E:]
                                         ).chunk(2, dim=-1)
            else:
                k = linear_rule_apply(rule, key, weights[1], biases[1])
                v = linear_rule_apply(rule, value, weights[2], biases[2])
            projected = (q, k, v)
        else:
            weights = (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight)
            projected = tuple(linear_rule_apply(rule, t, w, b) for t, w, b in zip((query, key, value), weights, biases))
        return tuple(t.unflatten(-1, (H, E // H)).transpose(1, 2) for t in projected)

    @staticmethod
    def _mask(attn_mask, key_padding_mask, batch, heads, dtype):
        """One additive mask broadcastable to ``(B, H, L, S)``, or None."""
        attn_mask, key_padding_mask = (None if mask is None else additive_from_masked(mask, dtype).to(dtype)
                                       for mask in (attn_mask, key_padding_mask))
        if attn_mask is not None and attn_mask.dim() == 3:
            attn_mask = attn_mask.view(batch, heads, *attn_mask.shape[1:])
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask[:, None, None, :]
            attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
        return attn_mask

    @staticmethod
    @torch.no_grad()
    def _weights(q, k, mask, causal, average):
        scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
        if mask is not None:
            scores = scores + mask
        if causal:
            scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float('-inf'))
        weights = scores.softmax(-1)
        return weights.mean(1) if average else weights
