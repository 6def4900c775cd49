"""Moved to :mod:`lxt_ext.data`; these names stay importable from here."""
from .data import IMAGE_SUFFIXES, load_images, sample_image  # noqa: F401
