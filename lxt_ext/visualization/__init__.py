"""Pictures of relevance, one module per modality: ``image`` (heatmaps of pixel relevance)."""
from .image import imgify, save_heatmap

__all__ = ['imgify', 'save_heatmap']
