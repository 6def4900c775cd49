"""Attention under LRP rules.

- ``lrp``: ``attention_lrp``, the fused attention whose backward is AttnLRP or CP-LRP (its dispatch between
  ATen's kernels and lxt_ext's own lives in ``lxt_ext.ops.fused_attention``);
- ``eager``: attention formed eagerly with rules on its pieces (``eager_attention``);
- ``multihead``: ``torch.nn.MultiheadAttention`` with its projections (``MultiheadAttentionRule``).
"""
from .eager import eager_attention, softmax_rule, uniform_matmul
from .lrp import attention_lrp
from .multihead import MultiheadAttentionRule

__all__ = ['attention_lrp', 'eager_attention', 'uniform_matmul', 'softmax_rule', 'MultiheadAttentionRule']
