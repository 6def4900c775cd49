"""Moved to ``lxt_ext.models.huggingface``; this module keeps the old imports working."""
from .models.huggingface import Conv1DRule, GatedMLP, HFAttention, transformers_rule

__all__ = ['HFAttention', 'GatedMLP', 'Conv1DRule', 'transformers_rule']
