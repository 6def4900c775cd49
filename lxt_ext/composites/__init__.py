"""lxt_ext's composites: zennit's LRP composites for CNNs with the fused rules (``cnn``), and the
attention-aware composites for transformers in the Gradient x Input convention (``transformer``).

Every composite keeps zennit's convention at the model's output: the seed an attributor passes there is the
output's relevance. ``NAMES`` is the one table of their names, used by the command line and by zennit's
composite registry (as ``lxt_ext_<name>``).
"""
from zennit.composites import register_composite

from ..batch_norm_fold import BatchNormFolding
from .cnn import (EpsilonAlpha2Beta1, EpsilonAlpha2Beta1Flat, EpsilonGammaBox, EpsilonPlus, EpsilonPlusFlat,
                  ZENNIT_NAMES, ZennitRegistryOverride, layer_map_base, use_in_zennit_registry)
from .transformer import LanguageTransformer, TransformerComposite, UnmappedModuleError, ViTEpsilon, ViTGamma

__all__ = ['NAMES', 'use_in_zennit_registry', 'ZennitRegistryOverride', 'BatchNormFolding', 'EpsilonGammaBox',
           'EpsilonPlus', 'EpsilonAlpha2Beta1', 'EpsilonPlusFlat', 'EpsilonAlpha2Beta1Flat', 'ViTEpsilon', 'ViTGamma',
           'LanguageTransformer', 'TransformerComposite', 'UnmappedModuleError', 'layer_map_base']

# name -> composite class: the command line's --composite and zennit's registry (lxt_ext_<name>)
NAMES = {
    **ZENNIT_NAMES,  # the CNN composites, by zennit's names
    'vit_gamma': ViTGamma,
    'vit_epsilon': ViTEpsilon,
    'language_transformer': LanguageTransformer,
}
for _name, _composite in NAMES.items():
    register_composite(f'lxt_ext_{_name}')(_composite)
