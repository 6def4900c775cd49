"""Moved: the transformer composites live in ``lxt_ext.transformer.composites`` (importable from
``lxt_ext.composites``); this module keeps the old imports working."""
from .transformer.composites import (LanguageTransformer, TransformerComposite, UnmappedModuleError, ViTEpsilon,
                                     ViTGamma)

__all__ = ['TransformerComposite', 'ViTEpsilon', 'ViTGamma', 'LanguageTransformer', 'UnmappedModuleError']
