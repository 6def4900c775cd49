"""lxt_ext: fused C++/CUDA LRP rules for zennit.

Swap ``zennit.rules`` for ``lxt_ext.rules`` and ``zennit.composites`` for ``lxt_ext.composites``:
the same relevance, computed by fused extension ops with less memory and time. Transformers (ViTs
from torchvision, timm and Hugging Face; BERT, GPT-2, LLaMA-family) get AttnLRP or CP-LRP through
``lxt_ext.composites.ViTGamma``/``ViTEpsilon``/``LanguageTransformer``.
"""
from . import attention, attribution, composites, models, rules, transformer
from .explanation import Explainer, Explanation, explain, explain_batch
from .job import ExplainJob
from . import transformer_composites, transformer_rules  # noqa: F401  (the old module paths)
from .ops import cuda_built

__version__ = '0.2.0'
__all__ = ['explain', 'explain_batch', 'Explainer', 'Explanation', 'ExplainJob', 'rules', 'composites', 'transformer', 'models', 'attention', 'attribution', 'cuda_built', '__version__']
