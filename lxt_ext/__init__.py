"""lxt_ext: fused C++/CUDA LRP rules for zennit.

Swap ``zennit.rules`` for ``lxt_ext.rules`` and ``zennit.composites`` for ``lxt_ext.composites``:
the same relevance, computed by fused extension ops with less memory and time. Transformers (ViTs
from torchvision, timm and Hugging Face; BERT, GPT-2, LLaMA-family) get AttnLRP or CP-LRP through
``lxt_ext.composites.ViTGamma``/``ViTEpsilon``/``LanguageTransformer``.
"""
from . import attention, attribution, composites, models, rules, transformer
from .attribution import Explainer, Explanation, explain, explain_batch
from .job import ExplainJob, JobSettings
from .ops import cuda_built

__version__ = '0.4.0'  # the one place of the version (setup.py reads it)
__all__ = ['explain', 'explain_batch', 'Explainer', 'Explanation', 'ExplainJob', 'JobSettings', 'rules', 'composites',
           'transformer', 'models', 'attention', 'attribution', 'cuda_built', '__version__']
