"""Old module path of ``lxt_ext.data.sample``."""
from .data import sample_image  # noqa: F401
