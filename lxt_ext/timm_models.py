"""Moved to ``lxt_ext.models.timm``; this module keeps the old imports working."""
from .models.timm import TimmAttention, Unsupported

__all__ = ['TimmAttention', 'Unsupported']
