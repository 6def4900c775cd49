"""Relevance of text: token heatmaps as self-contained HTML or PNG (``latex``: PDF through LaTeX).

Tokens come as the tokenizer's strings (``tokenizer.convert_ids_to_tokens(ids)``) with one relevance
value each (for input-embedding relevance ``(tokens, dim)``: its sum over ``dim``). ``clean_tokens``
turns them into text: byte-level BPE's byte alphabet decoded (GPT-2's ``Ġ`` space, ``Ċ`` newline, and
every other byte, UTF-8 characters split over tokens appearing at the token that completes them),
SentencePiece's ``▁`` as a space and its byte tokens (``<0x0A>``) decoded the same way, WordPiece's
``##`` continuations joined and its other tokens starting words. A token starting with whitespace
starts a word; ``merge_words`` sums relevance per word.

Colours are LXT's and zennit's ``bwr`` map at ``(R / max|R| + 1) / 2``: positive relevance red,
negative blue, zero white, normalised by the largest ``|R|`` of the sequence.

LXT's ``lxt.utils.pdf_heatmap`` is the anchor of the LaTeX (a ``\\colorbox`` per token); this one needs
only LaTeX's base packages (``color``), escapes LaTeX's special characters, and sizes the page to
the text. lualatex and xelatex (preferred when installed) set any character their font has; pdflatex
sets ASCII and the Latin-1 letters, other characters become ``?`` with a warning.
"""
import html
import os
import warnings

from .._docstrings import shared_parameters
from .latex import text_latex, text_pdf
from .tokens import _units, token_colours

__all__ = ['text_html', 'text_image', 'save_text_heatmap', 'FONT']

# Debian's fonts-dejavu-core; matplotlib ships the same font as package data.
FONT = '/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf'


@shared_parameters('tokens', 'token_relevance', 'words', 'scheme', leading=True)
def text_html(tokens, relevance, words=False, scheme='auto', title=None, font_size=16):
    """A self-contained HTML page (inline CSS, no external resources): one ``<span class="token">`` per
    token (or word, with ``words``) coloured by its relevance (``data-relevance`` and the tooltip hold the
    value).

    Parameters
    ----------
    title : str, optional
        The page's title and heading.
    font_size : int, optional
        In CSS pixels (default 16).

    Returns
    -------
    str
        The HTML page.
    """
    units, relevance = _units(tokens, relevance, words, scheme)
    colours = token_colours(relevance)
    parts = []
    for i, ((lead, body, newline, r), rgb) in enumerate(zip(units, colours)):
        red, green, blue = (int(round(c * 255)) for c in rgb)
        parts.append(html.escape(lead) + f'<span class="token" data-index="{i}" data-relevance="{r:.6g}" '
                     f'title="{r:.4g}" style="background-color:rgb({red},{green},{blue})">'
                     f'{html.escape(body) or "&nbsp;"}</span>' + ('<br>' if newline else ''))
    heading = f'<h1>{html.escape(title)}</h1>' if title else ''
    return ('<!DOCTYPE html>\n<html><head><meta charset="utf-8">'
            f'<title>{html.escape(title or "relevance")}</title><style>'
            'body{margin:12px;background:#fff;color:#000;font-family:"DejaVu Sans",Verdana,sans-serif}'
            'h1{font-size:1.1em}'
            f'.heatmap{{font-size:{font_size}px;line-height:1.8;white-space:pre-wrap}}'
            '.token{white-space:pre;padding:2px 0;border-radius:2px}'
            f'</style></head><body>{heading}<div class="heatmap">{"".join(parts)}</div></body></html>\n')


def _font(font, size):
    from PIL import ImageFont

    candidates = [font] if font else [FONT, _matplotlib_font()]
    for path in candidates:
        if path and os.path.exists(path):
            return ImageFont.truetype(path, size)
    if font:
        raise FileNotFoundError(f'font file {font!r} not found')
    warnings.warn(f'DejaVu Sans not found ({FONT}: Debian package fonts-dejavu-core, or matplotlib\'s copy); '
                  f'using PIL\'s default font, which may lack characters')
    return ImageFont.load_default(size)


def _matplotlib_font():
    try:
        import matplotlib
    except ImportError:
        return None
    return os.path.join(os.path.dirname(matplotlib.__file__), 'mpl-data', 'fonts', 'ttf', 'DejaVuSans.ttf')


@shared_parameters('tokens', 'token_relevance', 'words', 'scheme', leading=True)
def text_image(tokens, relevance, words=False, scheme='auto', width=800, font_size=20, font=None, margin=10):
    """The heatmap as a PIL RGB image ``width`` pixels wide, each token's (or word's) box filled with its
    colour; lines break between words (inside a word only where it is longer than a line). ``font``: a
    TrueType file (default DejaVu Sans; PIL's default font with a warning where it is missing).

    Parameters
    ----------
    width : int, optional
        The image width in pixels (default 800).
    font_size : int, optional
        In pixels (default 20).
    font : str, optional
        A TrueType font file (default ``FONT``).
    margin : int, optional
        In pixels (default 10).

    Returns
    -------
    PIL.Image.Image
        The heatmap, ``width`` pixels wide and as high as the text.
    """
    from PIL import Image, ImageDraw

    units, relevance = _units(tokens, relevance, words, scheme)
    face = _font(font, font_size)
    ascent, descent = face.getmetrics()
    pad = max(1, font_size // 8)
    line = ascent + descent + 2 * pad + max(2, font_size // 4)
    space = face.getlength(' ')
    shown = [body or ' ' for _, body, _, _ in units]
    widths = [face.getlength(text) for text in shown]
    # the width of the word each unit starts (a word: units up to the next leading space or line break)
    word = [0.] * len(units)
    for i in reversed(range(len(units))):
        joined = i + 1 < len(units) and not units[i + 1][0] and not units[i][2]
        word[i] = widths[i] + (word[i + 1] if joined else 0.)
    boxes, x, y = [], margin, margin
    for i, (lead, _, newline, _) in enumerate(units):
        starts = i == 0 or bool(lead) or units[i - 1][2]
        if x > margin:
            x += space * len(lead.expandtabs(1))
        needed = word[i] if starts else widths[i]
        if x > margin and x + needed > width - margin:
            x, y = margin, y + line
        boxes.append((x, y, shown[i]))
        x += widths[i]
        if newline:
            x, y = margin, y + line
    image = Image.new('RGB', (width, int(y + line + margin)), 'white')
    draw = ImageDraw.Draw(image)
    for (x, y, shown), rgb in zip(boxes, token_colours(relevance)):
        fill = tuple(int(round(c * 255)) for c in rgb)
        draw.rectangle([x, y, x + face.getlength(shown) - 1, y + ascent + descent + 2 * pad - 1], fill=fill)
        draw.text((x, y + pad), shown, font=face, fill='black')
    return image


@shared_parameters('tokens', 'token_relevance', leading=True)
def save_text_heatmap(tokens, relevance, path, words=False, scheme='auto', **options):
    """Write the heatmap to ``path`` by its suffix: ``.html`` (``text_html``), ``.png`` (``text_image``),
    ``.pdf`` (``text_pdf``), ``.tex`` (``text_latex``); ``options`` go to that function. Returns ``path``.

    Parameters
    ----------
    path : str
        The file to write; its suffix picks the format.
    words : bool, optional
        Merge tokens into words, their relevance summed (default False).
    scheme : {'auto', 'byte_level', 'sentencepiece', 'wordpiece', 'plain'}, optional
        How tokens are turned into text (default ``'auto'``, see ``clean_tokens``).
    **options
        Passed to the function of the format.

    Returns
    -------
    str
        ``path``.
    """
    suffix = os.path.splitext(str(path))[1].lower()
    if suffix in ('.html', '.htm', '.tex'):
        make = text_html if suffix != '.tex' else text_latex
        with open(path, 'w', encoding='utf-8') as file:
            file.write(make(tokens, relevance, words, scheme, **options))
    elif suffix == '.png':
        text_image(tokens, relevance, words, scheme, **options).save(path)
    elif suffix == '.pdf':
        text_pdf(tokens, relevance, path, words, scheme, **options)
    else:
        raise ValueError(f'cannot tell the format of {str(path)!r}: use .html, .png, .pdf or .tex')
    return path
