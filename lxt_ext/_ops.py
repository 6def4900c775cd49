"""Loads the compiled extension, which registers ``torch.ops.lxt_ext.*``."""
from . import _C  # noqa: F401  (importing registers the ops)

cuda_built = _C.cuda_built
ops = __import__('torch').ops.lxt_ext
