"""Token heatmaps as LaTeX and PDF. LXT's ``lxt.utils.pdf_heatmap`` is the anchor (a ``\\colorbox`` per token);
this one needs only LaTeX's base packages (``color``), escapes LaTeX's special characters, and sizes the page to
the text. lualatex and xelatex (preferred when installed) set any character their font has; pdflatex sets ASCII
and the Latin-1 letters, other characters become ``?`` with a warning.
"""
import os
import shutil
import subprocess
import tempfile
import warnings

from .._docstrings import shared_parameters
from .tokens import _units, token_colours

__all__ = ['text_latex', 'text_pdf', 'LatexEngineNotFound', 'ENGINES']

ENGINES = ('lualatex', 'xelatex', 'pdflatex')  # the first installed is the default: Unicode engines first
_DEBIAN = {'pdflatex': 'texlive-latex-base', 'xelatex': 'texlive-xetex', 'lualatex': 'texlive-luatex'}


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


@shared_parameters('tokens', 'token_relevance', 'words', 'scheme', leading=True)
def text_latex(tokens, relevance, words=False, scheme='auto', engine='pdflatex', width_mm=160, margin_mm=4):
    """LaTeX source of the heatmap: a ``\\colorbox`` per token (or word) on a page ``width_mm`` wide and
    as high as the text, using only LaTeX's base packages. ``engine``: the engine it is written for
    (pdflatex gets ASCII and Latin-1 letters; other characters become ``?`` with a warning).

    Parameters
    ----------
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


@shared_parameters('tokens', 'token_relevance', leading=True)
def text_pdf(tokens, relevance, path, words=False, scheme='auto', engine=None, width_mm=160, timeout=120):
    """Compile ``text_latex`` to the PDF ``path`` with ``engine`` (default: the first of ``ENGINES`` installed;
    ``LatexEngineNotFound`` names what is missing). Returns ``path``.

    Parameters
    ----------
    path : str
        The PDF file to write.
    words : bool, optional
        Merge tokens into words, their relevance summed (default False).
    scheme : {'auto', 'byte_level', 'sentencepiece', 'wordpiece', 'plain'}, optional
        How tokens are turned into text (default ``'auto'``, see ``clean_tokens``).
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
