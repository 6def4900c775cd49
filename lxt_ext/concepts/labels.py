"""Neuron labels: each unit labelled by what its reference samples share, with a purity score (the seed's
"activation maximisation" labels, for relevance maximisation too).

A unit's reference samples are its top-ranked samples of a data set (zennit-crp's relevance or activation
maximisation, :meth:`lxt_ext.concepts.TransformerFeatureVisualization.reference_indices`: ``(ranks, units)``
data-set indices, best first, and the token of each unit's largest value there).

- Classes (:func:`label_units`): with a class per sample (the embedded model's shapes), a unit's label is the
  majority class of its top ``k`` references and its purity the share of those ``k`` that carry it,
  ``purity = max_c #{r < k : class(ref_r) = c} / k``; ties go to the smaller class index. ``k`` references drawn
  at random from ``C`` balanced classes give a purity of about ``1 / C`` for large ``k``, more for small ``k`` (the
  largest of ``C`` counts: 0.32 for ``k = 20``, ``C = 5``): compare with ``k`` random samples (the chance level)
  and with random units.
- Text (:func:`label_text_units`): a unit's references are token spans around its top token (``window``
  tokens before and after it, clipped to the sequence); its label is the n-gram found in the most spans (each
  span counted once per n-gram), its purity the share of the ``k`` spans that contain it. Ties go to the longer
  n-gram, then to the one seen first (in rank order). ``window=0, n=1`` labels a unit by its top token alone.

::

    from lxt_ext.concepts import label_units

    indices, values, tokens = fv.reference_indices(layer, 'relevance', r_range=(0, 20))
    labels = label_units(indices, dataset_labels)        # k = all 20 ranks given
    labels.label[u], labels.purity[u]                    # unit u's majority class and its share of the 20
"""
from collections import Counter
from typing import NamedTuple

import torch

__all__ = ['UnitLabels', 'label_units', 'TextLabel', 'label_text_units']


class UnitLabels(NamedTuple):
    """What :func:`label_units` gives (a named tuple of these fields).

    Parameters
    ----------
    label : torch.Tensor
        ``(units,)`` int64: each unit's majority class among its top ``k`` references.
    purity : torch.Tensor
        ``(units,)`` float64 in ``1/k .. 1``: the share of the ``k`` references that carry ``label``.
    counts : torch.Tensor
        ``(units, classes)`` int64: how many of the ``k`` references carry each class.
    k : int
        The references per unit.
    """
    label: torch.Tensor
    purity: torch.Tensor
    counts: torch.Tensor
    k: int


def _ranks(reference, k, name):
    """(k, units) int64 of a (ranks, units) array, its first ``k`` ranks (default all)."""
    reference = torch.as_tensor(reference)
    if reference.ndim != 2:
        raise ValueError(f'{name}: reference_indices must be (ranks, units), got shape {tuple(reference.shape)}')
    if reference.is_floating_point() or reference.is_complex() or reference.dtype == torch.bool:
        raise TypeError(f'{name}: reference_indices must be integer data-set indices, got {reference.dtype}')
    k = reference.shape[0] if k is None else k
    if isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= reference.shape[0]:
        raise ValueError(f'{name}: k must be an int in 1..{reference.shape[0]} (the ranks given), got {k!r}')
    reference = reference[:k].long()
    if reference.numel() and reference.min() < 0:
        raise IndexError(f'{name}: reference_indices must be 0 or more, got {reference.min().item()}')
    return reference, k


def label_units(reference_indices, labels, k=None, num_classes=None):
    """Label each unit by the majority class of its top ``k`` reference samples (module doc).

    Parameters
    ----------
    reference_indices : array_like
        ``(ranks, units)`` data-set indices, best first (``reference_indices(...)[0]`` of
        :class:`~lxt_ext.concepts.TransformerFeatureVisualization`, zennit-crp's ``d_c_sorted``).
    labels : array_like
        ``(samples,)`` the class of each data-set sample (integers 0 or more).
    k : int, optional
        The references per unit: the first ``k`` ranks (default all ranks given).
    num_classes : int, optional
        The classes counted (default ``max(labels) + 1``).

    Returns
    -------
    UnitLabels

    Raises
    ------
    ValueError, TypeError, IndexError
        Shapes or types that do not fit, ``k`` outside ``1 .. ranks``, an index outside ``labels``.
    """
    reference, k = _ranks(reference_indices, k, 'label_units')
    labels = torch.as_tensor(labels)
    if labels.ndim != 1 or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f'label_units: labels must be a 1-D integer array, got {labels.dtype} of shape '
                         f'{tuple(labels.shape)}')
    labels = labels.long()
    if labels.numel() and labels.min() < 0:
        raise ValueError(f'label_units: labels must be 0 or more, got {labels.min().item()}')
    if reference.numel() and reference.max() >= len(labels):
        raise IndexError(f'label_units: reference index {reference.max().item()} is outside the {len(labels)} '
                         f'labels given')
    classes = int(labels.max()) + 1 if num_classes is None and labels.numel() else int(num_classes or 0)
    if labels.numel() and classes <= labels.max():
        raise ValueError(f'label_units: num_classes={num_classes} but a label is {labels.max().item()}')
    counts = torch.nn.functional.one_hot(labels[reference], classes).sum(0)    # (units, classes)
    top, label = counts.max(1)      # the first maximum: ties go to the smaller class
    return UnitLabels(label, top.double() / k, counts, k)


class TextLabel(NamedTuple):
    """One unit's label from :func:`label_text_units` (a named tuple of these fields).

    Parameters
    ----------
    label : str or tuple of int
        The n-gram found in the most spans (decoded with the tokenizer, else token ids).
    purity : float
        The share of the ``k`` spans that contain ``label``.
    ngrams : list of tuple
        The ``top`` most common n-grams as ``(label, share of spans)``, best first.
    spans : list
        The ``k`` spans, best reference first (decoded, else tuples of token ids).
    """
    label: object
    purity: float
    ngrams: list
    spans: list


def _window(window):
    if isinstance(window, int) and not isinstance(window, bool):
        window = (window, window)
    try:
        before, after = window
    except (TypeError, ValueError):
        raise ValueError(f'label_text_units: window must be an int or (before, after), got {window!r}') from None
    if not all(isinstance(w, int) and not isinstance(w, bool) and w >= 0 for w in (before, after)):
        raise ValueError(f'label_text_units: window must be 0 or more tokens, got {window!r}')
    return before, after


def label_text_units(reference_indices, reference_tokens, token_ids, k=None, window=2, n=(1, 2), tokenizer=None,
                     top=5, exclude=()):
    """Label each unit by the n-gram most common in the text spans around its top token in its top ``k``
    reference samples (module doc).

    Parameters
    ----------
    reference_indices : array_like
        ``(ranks, units)`` data-set indices, best first (``reference_indices(...)[0]``).
    reference_tokens : array_like
        ``(ranks, units)`` the token of the unit's largest value in each reference (``reference_indices(...)[2]``).
    token_ids : sequence
        The data set's token ids: ``token_ids[i]`` is sample ``i``'s sequence (a ``(samples, tokens)`` tensor or a
        list of lists of varying length).
    k : int, optional
        The references per unit (default all ranks given).
    window : int or tuple of int, optional
        Tokens before and after the top token in a span (an int: both; default 2). A causal language model's
        unit at token ``t`` sees only tokens ``<= t``: ``(w, 0)`` keeps to them.
    n : int or tuple of int, optional
        The n-gram lengths counted (default unigrams and bigrams).
    tokenizer : optional
        Decodes token ids: an object with ``decode(list of ids) -> str`` (Hugging Face tokenizers) or a callable
        of a list of ids; default none (labels and spans are tuples of ids).
    top : int, optional
        The n-grams listed per unit (default 5).
    exclude : iterable of int, optional
        Token ids an n-gram must not contain (padding, special tokens).

    Returns
    -------
    list of TextLabel
        One per unit.

    Raises
    ------
    ValueError, TypeError, IndexError
        Shapes that do not fit, ``k`` outside ``1 .. ranks``, a bad window or ``n``, an index or token outside
        ``token_ids``.
    """
    reference, k = _ranks(reference_indices, k, 'label_text_units')
    positions = torch.as_tensor(reference_tokens)
    if positions.ndim != 2 or positions.shape[1] != reference.shape[1] or positions.shape[0] < k:
        raise ValueError(f'label_text_units: reference_tokens must be (ranks, units) like reference_indices, got '
                         f'{tuple(positions.shape)} for {k} ranks of {reference.shape[1]} units')
    positions = positions[:k].long()
    before, after = _window(window)
    lengths = (n,) if isinstance(n, int) else tuple(n)
    if not lengths or not all(isinstance(m, int) and not isinstance(m, bool) and m > 0 for m in lengths):
        raise ValueError(f'label_text_units: n must be a positive int or a tuple of them, got {n!r}')
    exclude = {int(t) for t in exclude}
    if tokenizer is None:
        decode = tuple
    elif hasattr(tokenizer, 'decode'):
        def decode(ids):
            return tokenizer.decode(list(ids))
    elif callable(tokenizer):
        def decode(ids):
            return tokenizer(list(ids))
    else:
        raise TypeError(f'label_text_units: tokenizer must have decode() or be callable, got {type(tokenizer)}')
    results = []
    for unit in range(reference.shape[1]):
        counts, first, spans = Counter(), {}, []
        for rank in range(k):
            index, position = int(reference[rank, unit]), int(positions[rank, unit])
            if not 0 <= index < len(token_ids):
                raise IndexError(f'label_text_units: reference index {index} is outside the {len(token_ids)} '
                                 f'sequences given')
            ids = [int(t) for t in token_ids[index]]
            if not 0 <= position < len(ids):
                raise IndexError(f'label_text_units: token {position} is outside sequence {index} '
                                 f'({len(ids)} tokens)')
            span = ids[max(0, position - before): position + after + 1]
            spans.append(span)
            grams = dict.fromkeys(tuple(span[i:i + m]) for i in range(len(span)) for m in lengths
                                  if i + m <= len(span))        # once per span, in reading order
            for gram in grams:
                if not exclude.intersection(gram):
                    counts[gram] += 1
                    first.setdefault(gram, len(first))
        ranked = sorted(counts, key=lambda g: (-counts[g], -len(g), first[g]))
        ngrams = [(decode(g), counts[g] / k) for g in ranked[:top]]
        label, purity = ngrams[0] if ngrams else (None, 0.0)
        results.append(TextLabel(label, purity, ngrams, [decode(s) for s in spans]))
    return results

