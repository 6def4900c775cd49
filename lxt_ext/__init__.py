"""lxt_ext: fused C++/CUDA LRP rules for zennit.

Swap ``zennit.rules`` for ``lxt_ext.rules`` and ``zennit.composites`` for ``lxt_ext.composites``:
the same relevance, computed by fused extension ops with less memory and time.
"""
from . import composites, rules
from ._ops import cuda_built

__version__ = '0.1.0'
__all__ = ['rules', 'composites', 'cuda_built', '__version__']
