"""Tokens as text, and their colours: ``clean_tokens`` turns a tokenizer's strings into text (byte-level BPE,
SentencePiece, WordPiece), ``merge_words`` sums relevance per word, ``token_colours`` gives LXT's and zennit's
``bwr`` colour of each value (positive red, negative blue, zero white, normalised by the largest ``|R|``).
"""
import codecs
import re

import numpy as np
from zennit.image import CMAPS

__all__ = ['clean_tokens', 'merge_words', 'token_colours', 'SCHEMES']

SCHEMES = ('auto', 'byte_level', 'sentencepiece', 'wordpiece', 'plain')
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
