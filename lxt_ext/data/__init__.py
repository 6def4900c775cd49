"""Input data for the command line and the examples: the embedded sample image, and images from disk."""
from .images import IMAGE_SUFFIXES, load_images
from .sample import sample_image

__all__ = ['IMAGE_SUFFIXES', 'load_images', 'sample_image']
