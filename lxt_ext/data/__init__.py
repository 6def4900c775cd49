"""Input data for the command line and the examples: the embedded sample image (and, in ``embedded``, the
embedded trained model with its sample images and masks)."""
from .sample import sample_image

__all__ = ['sample_image']
