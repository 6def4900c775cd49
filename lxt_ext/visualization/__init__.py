"""Pictures of relevance, one module per modality: ``image`` (heatmaps of pixel relevance), ``text``
(token heatmaps as HTML, PNG and PDF)."""
from .image import imgify, save_heatmap
from .text import clean_tokens, merge_words, save_text_heatmap, text_html, text_image, text_latex, text_pdf

__all__ = ['imgify', 'save_heatmap', 'clean_tokens', 'merge_words', 'save_text_heatmap', 'text_html', 'text_image',
           'text_latex', 'text_pdf']
