"""Pictures of relevance, one module per kind of picture: ``image`` (heatmaps of pixel relevance), ``tokens``
(tokens as text and their colours), ``text`` (token heatmaps as HTML and PNG), ``latex`` (as LaTeX and PDF),
``generation`` (a generated text's relevance as an interactive HTML page)."""
from .generation import generation_html, save_generation_page
from .image import imgify, save_heatmap
from .latex import text_latex, text_pdf
from .text import save_text_heatmap, text_html, text_image
from .tokens import clean_tokens, merge_words

__all__ = ['imgify', 'save_heatmap', 'clean_tokens', 'merge_words', 'save_text_heatmap', 'text_html', 'text_image',
           'text_latex', 'text_pdf', 'generation_html', 'save_generation_page']
