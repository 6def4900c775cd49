"""Relevance of text: token heatmaps as self-contained HTML, PNG, or PDF through LaTeX.

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
import codecs
import html
import os
import re
import shutil
import subprocess
import tempfile
import warnings

import numpy as np
from zennit.image import CMAPS

__all__ = ['clean_tokens', 'merge_words', 'token_colours', 'text_html', 'text_image', 'text_latex', 'text_pdf',
           'save_text_heatmap', 'LatexEngineNotFound', 'ENGINES', 'FONT']

SCHEMES = ('auto', 'byte_level', 'sentencepiece', 'wordpiece', 'plain')
ENGINES = ('lualatex', 'xelatex', 'pdflatex')  # the first installed is the default: Unicode engines first
_DEBIAN = {'pdflatex': 'texlive-latex-base', 'xelatex': 'texlive-xetex', 'lualatex': 'texlive-luatex'}
# Debian's fonts-dejavu-core; matplotlib ships the same font as package data.
FONT = '/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf'
_SPECIAL = re.compile(r'^(<[^<>\s]+>|\[[A-Za-z_]+\])$')  # <s>, </s>, <|endoftext|>, [CLS], [SEP], ...
_BYTE_TOKEN = re.compile(r'^<0x([0-9A-Fa-f]{2})>$')


def _byte_decoder():
    """GPT-2's byte alphabet (``bytes_to_unicode``) inverted: printable bytes stand for themselves, the
    others for characters from U+0100 on (space -> ``Ġ``, newline -> ``Ċ``)."""
    printable = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1), *range(ord('®'), ord('ÿ') + 1)]
    shifted = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + n): b for n, b in enumerate(shifted)})
    return table


_BYTES = _byte_decoder()
_SHIFTED = {c for c, b in _BYTES.items() if ord(c) >= 256}


def _scheme(tokens):
    if any('▁' in t or _BYTE_TOKEN.match(t) for t in tokens):
        return 'sentencepiece'
    if any(c in _SHIFTED for t in tokens for c in t) and all(c in _BYTES for t in tokens for c in t):
        return 'byte_level'
    if any(t.startswith('##') for t in tokens):
        return 'wordpiece'
    return 'plain'


def clean_tokens(tokens, scheme='auto'):
    """The text of each token (see the module doc); a leading space marks a token that starts a word.

    ``scheme``: ``'byte_level'`` (GPT-2, LLaMA 3, Qwen), ``'sentencepiece'`` (LLaMA 2, Gemma, T5),
    ``'wordpiece'`` (BERT), ``'plain'`` (tokens are text already) or ``'auto'``: told by the markers
    (``▁`` or byte tokens, GPT-2's byte alphabet, ``##``), else plain.

    Parameters
    ----------
    tokens : sequence of str
        The tokenizer's strings.
    scheme : {'auto', 'byte_level', 'sentencepiece', 'wordpiece', 'plain'}, optional
        The tokenizer's kind (default ``'auto'``).

    Returns
    -------
    list of str
        One text per token.
    """
    tokens = [str(t) for t in tokens]
    if scheme not in SCHEMES:
        raise ValueError(f'scheme must be one of {SCHEMES}, got {scheme!r}')
    scheme = _scheme(tokens) if scheme == 'auto' else scheme
    if scheme == 'wordpiece':
        return [t[2:] if t.startswith('##') else (' ' + t if i else t) for i, t in enumerate(tokens)]
    if scheme == 'plain':
        return list(tokens)
    decoder = codecs.getincrementaldecoder('utf-8')(errors='replace')
    texts = []
    for token in tokens:
        if scheme == 'byte_level' and not _SPECIAL.match(token):
            data = bytes(_BYTES[c] for c in token) if all(c in _BYTES for c in token) else token.encode()
        elif scheme == 'sentencepiece' and _BYTE_TOKEN.match(token):
            data = bytes([int(_BYTE_TOKEN.match(token).group(1), 16)])
        else:
            data = (token.replace('▁', ' ') if scheme == 'sentencepiece' else token).encode()
        texts.append(decoder.decode(data))
    texts[-1] += decoder.decode(b'', final=True) if texts else ''
    return texts


def _relevance(relevance, count):
    array = np.asarray(relevance.detach().float().cpu() if hasattr(relevance, 'detach') else relevance,
                       dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f'relevance must be 1-D, one value per token, got shape {tuple(array.shape)} (for '
                         f'input-embedding relevance of one sequence, sum the embedding dimension: r.sum(-1))')
    if len(array) != count:
        raise ValueError(f'{count} tokens but {len(array)} relevance values')
    if not np.isfinite(array).all():
        raise ValueError('relevance holds NaN or Inf')
    return array


def merge_words(tokens, relevance):
    """``(words, word relevance)``: cleaned ``tokens`` joined into words, relevance summed per word. A
    word starts at a token that starts with whitespace or follows one ending in it; spaces standing alone
    join the word after them, line breaks and special tokens (``<s>``, ``[CLS]``, ...) are words of
    their own.

    Parameters
    ----------
    tokens : sequence of str
        Token texts as :func:`clean_tokens` gives them.
    relevance : array_like
        One finite value per token.

    Returns
    -------
    words : list of str
        The words.
    word_relevance : numpy.ndarray
        Their relevance, float64.
    """
    relevance = _relevance(relevance, len(tokens))
    words, sums = [], []
    for token, r in zip(tokens, relevance):
        if words and _continues(words[-1], token):
            words[-1] += token
            sums[-1] += r
        else:
            words.append(token)
            sums.append(r)
    return words, np.array(sums)


def _kind(text):
    if _SPECIAL.match(text.strip()):
        return 'special'
    if not text.strip():
        return 'newline' if '\n' in text or '\r' in text else 'space'
    return 'text'


def _continues(word, token):
    """Whether ``token`` continues ``word`` (see ``merge_words``)."""
    before, after = _kind(word), _kind(token)
    if 'special' in (before, after) or 'newline' in (before, after):
        return False
    return before == 'space' or not (token[:1].isspace() or word[-1:].isspace())


def token_colours(relevance):
    """``(N, 3)`` RGB in 0..1 of zennit's ``bwr`` map at ``(R / max|R| + 1) / 2`` (all zero: white).

    Parameters
    ----------
    relevance : array_like
        N finite values.

    Returns
    -------
    numpy.ndarray
        (N, 3) RGB in 0..1.
    """
    relevance = _relevance(relevance, len(relevance))
    scale = max(np.abs(relevance).max(initial=0.), 1e-30)
    return CMAPS['bwr'](relevance / scale / 2 + .5).reshape(-1, 3)


def _units(tokens, relevance, words, scheme):
    """``[(leading whitespace, shown text, line break after, relevance)]`` for the renderers."""
    tokens = clean_tokens(tokens, scheme)
    relevance = _relevance(relevance, len(tokens))
    if words:
        tokens, relevance = merge_words(tokens, relevance)
    units = []
    for text, r in zip(tokens, relevance):
        if _kind(text) == 'newline':
            units.append(('', '↵' * max(text.count('\n'), 1), True, float(r)))
            continue
        body = text.lstrip(' \t')
        lead = text[:len(text) - len(body)]
        newline = body.endswith(('\n', '\r'))
        body = body.replace('\r\n', '\n').replace('\r', '\n').replace('\n', '↵').replace('\t', ' ').rstrip(' ')
        units.append((lead, body, newline, float(r)))
    return units, relevance


def text_html(tokens, relevance, words=False, scheme='auto', title=None, font_size=16):
    """A self-contained HTML page (inline CSS, no external resources): one ``<span class="token">`` per
    token (or word, with ``words``) coloured by its relevance (``data-relevance`` and the tooltip hold the
    value).

    Parameters
    ----------
    tokens : sequence of str
        The tokenizer's strings, e.g. ``tokenizer.convert_ids_to_tokens(ids)``.
    relevance : array_like
        One finite value per token (1-D; sum input-embedding relevance over its last dimension first).
    words : bool, optional
        Merge tokens into words, their relevance summed (default False).
    scheme : {'auto', 'byte_level', 'sentencepiece', 'wordpiece', 'plain'}, optional
        How tokens are turned into text (default ``'auto'``, see :func:`clean_tokens`).
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


def text_image(tokens, relevance, words=False, scheme='auto', width=800, font_size=20, font=None, margin=10):
    """The heatmap as a PIL RGB image ``width`` pixels wide, each token's (or word's) box filled with its
    colour; lines break between words (inside a word only where it is longer than a line). ``font``: a
    TrueType file (default DejaVu Sans; PIL's default font with a warning where it is missing).

    Parameters
    ----------
    tokens : sequence of str
        The tokenizer's strings, e.g. ``tokenizer.convert_ids_to_tokens(ids)``.
    relevance : array_like
        One finite value per token (1-D; sum input-embedding relevance over its last dimension first).
    words : bool, optional
        Merge tokens into words, their relevance summed (default False).
    scheme : {'auto', 'byte_level', 'sentencepiece', 'wordpiece', 'plain'}, optional
        How tokens are turned into text (default ``'auto'``, see :func:`clean_tokens`).
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


_LATEX_ESCAPES = {'\\': r'\textbackslash{}', '{': r'\{', '}': r'\}', '$': r'\$', '&': r'\&', '#': r'\#',
                  '^': r'\textasciicircum{}', '_': r'\_', '~': r'\textasciitilde{}', '%': r'\%',
                  '<': r'\textless{}', '>': r'\textgreater{}', '|': r'\textbar{}',
                  '↵': r'\ensuremath{\hookleftarrow}',
                  # no ligatures: -- and --- would become dashes, '' and `` quotes (LuaTeX ligatures through {})
                  '-': r'-\kern0pt ', "'": r"'\kern0pt ", '`': r'`\kern0pt '}


def _latex_text(text, unicode_engine, replaced):
    out = []
    for c in text:
        if c in _LATEX_ESCAPES:
            out.append(_LATEX_ESCAPES[c])
        elif unicode_engine or ' ' <= c <= '~' or '\u00c0' <= c <= '\u00ff':
            out.append(c)  # pdflatex: ASCII and the Latin-1 letters (inputenc utf8 with the OT1 accents)
        else:
            replaced.add(c)
            out.append('?')
    return ''.join(out)


def text_latex(tokens, relevance, words=False, scheme='auto', engine='pdflatex', width_mm=160, margin_mm=4):
    """LaTeX source of the heatmap: a ``\\colorbox`` per token (or word) on a page ``width_mm`` wide and
    as high as the text, using only LaTeX's base packages. ``engine``: the engine it is written for
    (pdflatex gets ASCII and Latin-1 letters; other characters become ``?`` with a warning).

    Parameters
    ----------
    tokens : sequence of str
        The tokenizer's strings, e.g. ``tokenizer.convert_ids_to_tokens(ids)``.
    relevance : array_like
        One finite value per token (1-D; sum input-embedding relevance over its last dimension first).
    words : bool, optional
        Merge tokens into words, their relevance summed (default False).
    scheme : {'auto', 'byte_level', 'sentencepiece', 'wordpiece', 'plain'}, optional
        How tokens are turned into text (default ``'auto'``, see :func:`clean_tokens`).
    engine : {'pdflatex', 'lualatex', 'xelatex'}, optional
        The engine the source is written for (default ``'pdflatex'``).
    width_mm : float, optional
        The page width in millimetres (default 160).
    margin_mm : float, optional
        In millimetres (default 4).

    Returns
    -------
    str
        The LaTeX document.
    """
    if engine not in ENGINES:
        raise ValueError(f'engine must be one of {ENGINES}, got {engine!r}')
    units, relevance = _units(tokens, relevance, words, scheme)
    unicode_engine, replaced, body = engine != 'pdflatex', set(), []
    for i, ((lead, text, newline, _), rgb) in enumerate(zip(units, token_colours(relevance))):
        box = r'\colorbox[rgb]{%.3f,%.3f,%.3f}{\strut %s}' % (*rgb, _latex_text(text, unicode_engine, replaced)
                                                            or r'\ ')
        joint = ' ' if lead and i else (r'\allowbreak' if i else '')
        body.append(joint + box + (r'\newline' if newline else ''))
    if replaced:
        warnings.warn(f'{engine} cannot set {"".join(sorted(replaced))!r}: shown as "?" (use xelatex or lualatex)')
    preamble = (r'\usepackage[utf8]{inputenc}' if engine == 'pdflatex' else
                r'\IfFileExists{fontspec.sty}{\usepackage{fontspec}}{}')
    page = (r'\pdfpagewidth' if engine != 'lualatex' else r'\pagewidth',
            r'\pdfpageheight' if engine != 'lualatex' else r'\pageheight')
    return '\n'.join([
        r'\documentclass[11pt]{article}', preamble, r'\usepackage{color}', r'\pagestyle{empty}',
        rf'\setlength{{\textwidth}}{{{width_mm}mm}}', r'\setlength{\textheight}{5000pt}',
        rf'\setlength{{\oddsidemargin}}{{\dimexpr{margin_mm}mm-1in\relax}}',
        rf'\setlength{{\topmargin}}{{\dimexpr{margin_mm}mm-1in\relax}}',
        r'\setlength{\headheight}{0pt}', r'\setlength{\headsep}{0pt}', r'\setlength{\topskip}{0pt}',
        r'\setlength{\parindent}{0pt}', r'\setlength{\fboxsep}{1pt}',
        r'\begin{document}',
        r'\setbox0=\vbox{\hsize=\textwidth\raggedright\lineskip=2pt',
        '%\n'.join(body) + '%', '}',
        rf'{page[0]}=\dimexpr\textwidth+{2 * margin_mm}mm\relax',
        rf'{page[1]}=\dimexpr\ht0+\dp0+{2 * margin_mm}mm\relax',
        r'\box0', r'\end{document}', ''])


class LatexEngineNotFound(RuntimeError):
    """No LaTeX engine (or not the one asked for) is installed."""


def _engine(engine):
    if engine is not None:
        if engine not in ENGINES:
            raise ValueError(f'engine must be one of {ENGINES}, got {engine!r}')
        if shutil.which(engine) is None:
            raise LatexEngineNotFound(f'the LaTeX engine {engine} is not installed (not on PATH); install it (Debian: '
                                      f'{_DEBIAN[engine]}) or pass another engine')
        return engine
    for name in ENGINES:
        if shutil.which(name) is not None:
            return name
    raise LatexEngineNotFound(f'no LaTeX engine found: none of {", ".join(ENGINES)} is on PATH; install one (Debian: '
                              f'texlive-latex-base gives pdflatex) or write HTML or PNG instead')


def text_pdf(tokens, relevance, path, words=False, scheme='auto', engine=None, width_mm=160, timeout=120):
    """Compile ``text_latex`` to the PDF ``path`` with ``engine`` (default: the first of ``ENGINES`` installed;
    ``LatexEngineNotFound`` names what is missing). Returns ``path``.

    Parameters
    ----------
    tokens : sequence of str
        The tokenizer's strings, e.g. ``tokenizer.convert_ids_to_tokens(ids)``.
    relevance : array_like
        One finite value per token (1-D; sum input-embedding relevance over its last dimension first).
    path : str
        The PDF file to write.
    words : bool, optional
        Merge tokens into words, their relevance summed (default False).
    scheme : {'auto', 'byte_level', 'sentencepiece', 'wordpiece', 'plain'}, optional
        How tokens are turned into text (default ``'auto'``, see :func:`clean_tokens`).
    engine : {'lualatex', 'xelatex', 'pdflatex'}, optional
        The LaTeX engine (default: the first of ``ENGINES`` installed).
    width_mm : float, optional
        The page width in millimetres (default 160).
    timeout : float, optional
        Seconds the engine may run (default 120).

    Returns
    -------
    str
        ``path``.
    """
    engine = _engine(engine)
    source = text_latex(tokens, relevance, words, scheme, engine, width_mm)
    with tempfile.TemporaryDirectory() as folder:
        with open(os.path.join(folder, 'heatmap.tex'), 'w', encoding='utf-8') as file:
            file.write(source)
        result = subprocess.run([engine, '-interaction=nonstopmode', '-halt-on-error', 'heatmap.tex'], cwd=folder,
                                capture_output=True, text=True, errors='replace', timeout=timeout)
        if result.returncode != 0 or not os.path.exists(os.path.join(folder, 'heatmap.pdf')):
            raise RuntimeError(f'{engine} failed (exit {result.returncode}):\n{result.stdout[-3000:]}')
        shutil.copyfile(os.path.join(folder, 'heatmap.pdf'), path)
    return path


def save_text_heatmap(tokens, relevance, path, words=False, scheme='auto', **options):
    """Write the heatmap to ``path`` by its suffix: ``.html`` (``text_html``), ``.png`` (``text_image``),
    ``.pdf`` (``text_pdf``), ``.tex`` (``text_latex``); ``options`` go to that function. Returns ``path``.

    Parameters
    ----------
    tokens : sequence of str
        The tokenizer's strings, e.g. ``tokenizer.convert_ids_to_tokens(ids)``.
    relevance : array_like
        One finite value per token (1-D; sum input-embedding relevance over its last dimension first).
    path : str
        The file to write; its suffix picks the format.
    words : bool, optional
        Merge tokens into words, their relevance summed (default False).
    scheme : {'auto', 'byte_level', 'sentencepiece', 'wordpiece', 'plain'}, optional
        How tokens are turned into text (default ``'auto'``, see :func:`clean_tokens`).
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
