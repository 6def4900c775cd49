"""Input data for the command line and the examples: the embedded sample image (and, in ``embedded``, the
embedded trained model with its sample images and masks; in ``shapes``, the seeded generator of the images
it was trained on, for evaluations that need more than the shipped samples)."""
from .sample import sample_image

__all__ = ['sample_image']
