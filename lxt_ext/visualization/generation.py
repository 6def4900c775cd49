"""Generated text explained by relevance: one self-contained HTML page (inline CSS and script, no external
resources) with the prompt and the answer as one running text.

::

    from lxt_ext.attribution.generation import explain_generation
    from lxt_ext.visualization import save_generation_page

    g = explain_generation(model, ids, prompt_length, composite)
    tokens = tokenizer.convert_ids_to_tokens(g.ids.tolist())
    save_generation_page('answer.html', tokens, g.prompt_length, g.relevance, g.matrix, g.scores, g.log_probs,
                         score_name=g.target)

The page opens on the whole answer's relevance. Hovering a generated (underlined) token shows its own row of
the matrix: every token's relevance for that one token, normalised by the row's largest ``|R|``, the token
outlined; clicking it keeps that row (clicking it again, or the "whole answer" button, returns). The URL
fragment ``#token=i`` names the row shown, ``i`` counting generated tokens from 0 (the token at position
``prompt_length + i``): a page opened with it shows that row, and clicking a token rewrites it, so a view can
be linked.

Colours are those of :func:`lxt_ext.visualization.tokens.token_colours` (LXT's ``bwr``: positive red,
negative blue, zero white), computed here for the whole answer and for every row; the page holds them and the
values (``answer x tokens`` numbers) as JSON. What the page's script sets on each token element
(``<span class="token">``): ``style`` (its background colour), ``data-shown-relevance`` (the value shown),
``data-selected`` (on the selected generated token only); on ``<body>``, ``data-row`` (the row shown, or
``whole``).
"""
import html
import json
import operator
import os

import numpy as np

from .tokens import _relevance, _units, clean_tokens, token_colours

__all__ = ['generation_html', 'save_generation_page']

# The page's script: the whole answer or one row (from the JSON blob), selection, hover and the URL fragment.
_SCRIPT = r"""
(function () {
  'use strict';
  var data = JSON.parse(document.getElementById('generation-data').textContent);
  var tokens = Array.prototype.slice.call(document.querySelectorAll('#heatmap .token'));
  var caption = document.getElementById('caption');
  var scale = document.getElementById('legend-scale');
  var pinned = null;  // the selected generated token (index into the answer), or null: the whole answer

  function show(row, note) {
    var view = row === null ? data.whole : data.rows[row];
    var at = row === null ? -1 : data.prompt_length + row;
    tokens.forEach(function (token, i) {
      token.style.backgroundColor = '#' + view.colours[i];
      token.setAttribute('data-shown-relevance', String(view.relevance[i]));
      token.title = String(view.relevance[i]);
      if (i === at) { token.setAttribute('data-selected', 'true'); } else { token.removeAttribute('data-selected'); }
      token.classList.toggle('later', at >= 0 && i > at);
      if (token.hasAttribute('aria-pressed')) {
        token.setAttribute('aria-pressed', String(i === at && row === pinned));
      }
    });
    document.body.setAttribute('data-row', row === null ? 'whole' : String(row));
    caption.textContent = view.caption + (note ? ' (' + note + ')' : '');
    scale.textContent = view.scale;
  }

  function fromFragment() {
    var match = /^#token=(\d+)$/.exec(location.hash);
    if (!match) {
      return {row: null, note: location.hash.length > 1 ? 'fragment not understood: ' + location.hash : ''};
    }
    var row = parseInt(match[1], 10);
    if (data.rows === null) { return {row: null, note: 'rows are not available'}; }
    if (row >= data.rows.length) {
      return {row: null, note: 'no generated token ' + row + ', the answer has ' + data.rows.length};
    }
    return {row: row, note: ''};
  }

  function link(row) {
    var url = location.pathname + location.search + (row === null ? '' : '#token=' + row);
    try { history.replaceState(null, '', url); } catch (error) { location.hash = row === null ? '' : 'token=' + row; }
  }

  function select(row) {
    pinned = row;
    show(pinned);
    link(pinned);
  }

  function open() {
    var state = fromFragment();
    pinned = state.row;
    show(pinned, state.note);
  }

  if (data.rows !== null) {
    tokens.forEach(function (token) {
      if (!token.hasAttribute('data-step')) { return; }
      var row = parseInt(token.getAttribute('data-step'), 10);
      token.addEventListener('mouseenter', function () { show(row); });
      token.addEventListener('mouseleave', function () { show(pinned); });
      token.addEventListener('click', function () { select(pinned === row ? null : row); });
      token.addEventListener('keydown', function (event) {
        if (event.key === 'Enter' || event.key === ' ') { event.preventDefault(); select(pinned === row ? null : row); }
        if (event.key === 'Escape') { select(null); }
      });
    });
    document.getElementById('whole-answer').addEventListener('click', function () { select(null); });
    window.addEventListener('hashchange', open);
  }
  open();
})();
"""

_STYLE = ('body{margin:12px;background:#fff;color:#000;font-family:"DejaVu Sans",Verdana,sans-serif}'
          'h1{font-size:1.2em;margin:0 0 .4em}'
          '.caption{font-size:1em;font-weight:bold;margin:.3em 0}'
          '.controls,.note,.legend{font-size:.85em;margin:.3em 0;color:#333}'
          '.legend{display:flex;align-items:center;gap:.5em}'
          '.legend .bar{display:inline-block;width:160px;height:12px;border:1px solid #999}'
          '.heatmap{font-size:16px;line-height:1.9;white-space:pre-wrap;margin-top:.6em}'
          '.token{white-space:pre;padding:2px 0;border-radius:2px}'
          '.token.answer{text-decoration:underline;text-decoration-thickness:2px;text-underline-offset:3px}'
          '.token.answer[data-step]{cursor:pointer}'
          '.token.later{color:#888}'
          '.token[data-selected]{outline:2px solid #000;outline-offset:1px}')


def _numbers(values, name):
    """``values`` (tensor, array or nested lists) as a float64 array."""
    if hasattr(values, 'detach'):
        values = values.detach().float().cpu()
    try:
        return np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f'{name} must hold numbers: {error}') from None


def _per_answer(values, name, answer):
    if values is None:
        return None
    array = _numbers(values, name)
    if array.shape != (answer,):
        raise ValueError(f'{name} must hold one value per generated token, shape ({answer},), got '
                         f'{tuple(array.shape)}')
    return array


def _hex(colours):
    return ['%02x%02x%02x' % tuple(int(round(c * 255)) for c in rgb) for rgb in colours]


def _scale(values):
    return f'largest |R| {np.abs(values).max(initial=0.):.4g}'


def _view(values, caption):
    return {'relevance': [float(v) for v in values], 'colours': _hex(token_colours(values)),
            'caption': caption, 'scale': _scale(values)}


def _json_script(data):
    """JSON for a ``<script type="application/json">`` element: ``<``, ``>`` and ``&`` as JSON escapes, so no
    text can end the element (``</script>``) or open a comment."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(',', ':'))
    return text.replace('<', '\\u003c').replace('>', '\\u003e').replace('&', '\\u0026')


def generation_html(tokens, prompt_length, relevance, matrix=None, scores=None, log_probs=None, scheme='auto',
                    title=None, score_name='logit'):
    """A self-contained HTML page of a generated text explained by relevance (see the module doc): the prompt
    and the answer as one running text, one ``<span class="token">`` per token (``data-index`` its position,
    ``data-part`` ``prompt`` or ``answer``, ``data-relevance`` its relevance for the whole answer; generated
    tokens also ``data-step``, their index into the answer), coloured by the whole answer's relevance, or by one
    generated token's row of ``matrix`` (hover or click the token, or open the page with ``#token=i``).

    Parameters
    ----------
    tokens : sequence of str
        The tokenizer's strings of the prompt and the answer, e.g. ``tokenizer.convert_ids_to_tokens(ids)``.
    prompt_length : int
        How many of ``tokens`` are the prompt: ``1 <= prompt_length < len(tokens)``.
    relevance : array_like
        ``(tokens,)`` each token's relevance for the whole answer (a tensor, an array or a list).
    matrix : array_like, optional
        ``(answer, tokens)``: row ``i`` every token's relevance for generated token ``i`` (at position
        ``prompt_length + i``), as ``explain_generation`` gives it. Without it (None) the page shows only the whole
        answer and says that rows are not available.
    scores : array_like, optional
        ``(answer,)`` the value each generated token's relevance explains (its logit), shown in its caption.
    log_probs : array_like, optional
        ``(answer,)`` each generated token's log-probability, shown in its caption.
    scheme : {'auto', 'byte_level', 'sentencepiece', 'wordpiece', 'plain'}, optional
        How tokens are turned into text (default ``'auto'``, see ``lxt_ext.visualization.tokens.clean_tokens``).
    title : str, optional
        The page's title and heading.
    score_name : str, optional
        What ``scores`` are, for the captions (default ``'logit'``; ``explain_generation``'s ``target``).

    Returns
    -------
    str
        The HTML page.
    """
    tokens = [str(t) for t in tokens]
    try:
        prompt_length = operator.index(prompt_length)
    except TypeError:
        raise TypeError(f'prompt_length must be an integer, got {type(prompt_length).__name__}') from None
    if not 1 <= prompt_length < len(tokens):
        raise ValueError(f'prompt_length must leave at least one prompt token and one generated token: '
                         f'1 <= prompt_length < {len(tokens)} (the number of tokens), got {prompt_length}')
    answer = len(tokens) - prompt_length
    relevance = _relevance(_numbers(relevance, 'relevance'), len(tokens))
    units, _ = _units(tokens, relevance, False, scheme)
    texts = clean_tokens(tokens, scheme)
    scores = _per_answer(scores, 'scores', answer)
    log_probs = _per_answer(log_probs, 'log_probs', answer)
    if matrix is not None:
        matrix = _numbers(matrix, 'matrix')
        if matrix.shape != (answer, len(tokens)):
            raise ValueError(f'matrix must be (answer, tokens) = ({answer}, {len(tokens)}): one row per generated '
                             f'token, one value per token; got {tuple(matrix.shape)}')
        if not np.isfinite(matrix).all():
            raise ValueError('matrix holds NaN or Inf')

    whole = _view(relevance, f'Colours: each token\'s relevance for the whole answer ({answer} generated '
                             f'token{"s" if answer != 1 else ""})')
    rows = None
    if matrix is not None:
        rows = []
        for i, row in enumerate(matrix):
            numbers = [f'{score_name} {scores[i]:.3g}'] if scores is not None else []
            numbers += [f'log p {log_probs[i]:.3g}'] if log_probs is not None else []
            caption = f'Relevance for generated token {i}: {texts[prompt_length + i]!r}'
            rows.append(_view(row, caption + (f' ({", ".join(numbers)})' if numbers else '')))

    interactive = matrix is not None
    parts = []
    for i, ((lead, body, newline, r), colour) in enumerate(zip(units, whole['colours'])):
        step = i - prompt_length
        attributes = 'class="token prompt" data-part="prompt"' if step < 0 else \
            'class="token answer" data-part="answer"' + (
                f' data-step="{step}" tabindex="0" role="button" aria-pressed="false"' if interactive else '')
        parts.append(html.escape(lead) + f'<span {attributes} data-index="{i}" data-relevance="{float(r)!r}" '
                     f'title="{float(r)!r}" style="background-color:#{colour}">'
                     f'{html.escape(body) or "&nbsp;"}</span>' + ('<br>' if newline else ''))
    if interactive:
        controls = ('<div class="controls"><button type="button" id="whole-answer">whole answer</button> '
                    'Hover or click an underlined (generated) token to see every token\'s relevance for it alone; '
                    'click it again to return. The address <code>#token=i</code> opens generated token i '
                    '(counted from 0).</div>')
    else:
        controls = ('<p class="note" id="note">Underlined: the generated tokens. Relevance for single generated '
                    'tokens (rows) is not available: no matrix was given.</p>')
    gradient = ','.join(f'#{c}' for c in _hex(token_colours(np.linspace(-1., 1., 9))))
    legend = (f'<div class="legend">negative<span class="bar" style="background:linear-gradient(to right,'
              f'{gradient})"></span>positive <span>(blue &lt; 0, white 0, red &gt; 0; normalised by the '
              f'<span id="legend-scale">{html.escape(whole["scale"])}</span>)</span></div>')
    heading = f'<h1>{html.escape(title)}</h1>' if title else ''
    data = {'prompt_length': prompt_length, 'whole': whole, 'rows': rows}
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<title>{html.escape(title or "generated text: relevance")}</title><style>{_STYLE}</style></head>'
            f'<body data-row="whole">{heading}<h2 class="caption" id="caption">{html.escape(whole["caption"])}</h2>'
            f'{controls}{legend}<div class="heatmap" id="heatmap">{"".join(parts)}</div>'
            f'<script type="application/json" id="generation-data">{_json_script(data)}</script>'
            f'<script>{_SCRIPT}</script></body></html>\n')


def save_generation_page(path, tokens, prompt_length, relevance, matrix=None, scores=None, log_probs=None,
                         scheme='auto', title=None, score_name='logit'):
    """Write :func:`generation_html`'s page to ``path`` (UTF-8), creating its parent folders.

    Parameters
    ----------
    path : str or os.PathLike
        The file to write (``.html``).
    tokens : sequence of str
        The tokenizer's strings of the prompt and the answer.
    prompt_length : int
        How many of ``tokens`` are the prompt.
    relevance : array_like
        ``(tokens,)`` each token's relevance for the whole answer.
    matrix : array_like, optional
        ``(answer, tokens)``: row ``i`` every token's relevance for generated token ``i``.
    scores : array_like, optional
        ``(answer,)`` the value each generated token's relevance explains.
    log_probs : array_like, optional
        ``(answer,)`` each generated token's log-probability.
    scheme : {'auto', 'byte_level', 'sentencepiece', 'wordpiece', 'plain'}, optional
        How tokens are turned into text (default ``'auto'``).
    title : str, optional
        The page's title and heading.
    score_name : str, optional
        What ``scores`` are (default ``'logit'``).

    Returns
    -------
    str or os.PathLike
        ``path``.
    """
    page = generation_html(tokens, prompt_length, relevance, matrix, scores, log_probs, scheme, title, score_name)
    folder = os.path.dirname(os.fspath(path))
    if folder:
        os.makedirs(folder, exist_ok=True)
    with open(path, 'w', encoding='utf-8') as file:
        file.write(page)
    return path
