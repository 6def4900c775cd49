"""The statistics of a method comparison, fixed before the run: percentile-bootstrap intervals of each
method's mean score over the items (images, sentences), and paired bootstrap differences between every
two methods with a Holm correction across the pairs.

Bootstrap: ``B`` resamples of the ``N`` item indices, drawn with replacement from a seeded generator (the
same resamples for every method, so differences are paired: one item's scores move together). Of a
statistic ``m`` (the mean) the resampled values ``m*_1..m*_B`` give the interval
``[q_{a/2}, q_{1-a/2}]`` of their quantiles (linear interpolation), ``a = 1 - confidence``.

Paired difference of methods A and B: ``d_i = s_A,i - s_B,i`` per item, the mean ``d`` and its bootstrap
interval. Its two-sided p-value inverts the percentile interval: ``p = min(1, 2 min(P(d* <= 0),
P(d* >= 0)))`` with ``P(d* <= 0) = (1 + #{d*_b <= 0}) / (B + 1)`` (the +1 keeps p above zero), so the
(1 - a) interval excludes 0 when p < a, up to the resampling's granularity.

Holm's step-down correction over the ``m`` pairs: with the p-values sorted, ``p_(1) <= .. <= p_(m)``,
``p~_(i) = max_{j <= i} min(1, (m - j + 1) p_(j))``; a pair is significant when ``p~ < alpha``, which
bounds the family-wise error rate (any false "A differs from B" among all pairs) by ``alpha``.
"""
from typing import NamedTuple

import torch

__all__ = ['Interval', 'Comparison', 'bootstrap_interval', 'bootstrap_band', 'paired_comparisons', 'holm',
           'statistics_markdown', 'RESAMPLES', 'CONFIDENCE']

RESAMPLES = 10000
CONFIDENCE = 0.95


class Interval(NamedTuple):
    """A mean and its bootstrap interval.

    Parameters
    ----------
    mean : float
        The mean over the items.
    low, high : float
        The interval's bounds.
    """

    mean: float
    low: float
    high: float


class Comparison(NamedTuple):
    """Method ``a`` minus method ``b``, paired over the items.

    Parameters
    ----------
    a, b : str
        The methods.
    difference : float
        The mean of ``a``'s score minus ``b``'s, over the items.
    low, high : float
        The bootstrap interval of the mean difference (not Holm-adjusted).
    p : float
        The two-sided bootstrap p-value.
    p_holm : float
        ``p`` after Holm's correction over all pairs of the comparison.
    significant : bool
        ``p_holm < alpha``.
    """

    a: str
    b: str
    difference: float
    low: float
    high: float
    p: float
    p_holm: float
    significant: bool


def _scores(values, name='values'):
    values = torch.as_tensor(values, dtype=torch.float64).flatten()
    if values.numel() == 0:
        raise ValueError(f'{name} is empty')
    if not torch.isfinite(values).all():
        raise ValueError(f'{name} holds NaN or infinite values (drop the items without a score first)')
    return values


def _check(confidence, resamples):
    if not 0 < confidence < 1:
        raise ValueError(f'confidence must lie between 0 and 1, got {confidence}')
    if resamples < 1:
        raise ValueError(f'resamples must be positive, got {resamples}')


def _resampled_means(values, resamples, seed):
    """(B, ...) means of ``values`` (N, ...) over B seeded resamples of the N indices, in chunks of about
    2e7 gathered elements (bounded memory for long curves and many items)."""
    generator = torch.Generator().manual_seed(seed)
    n = values.shape[0]
    chunk = max(1, min(1000, int(2e7) // max(1, values.numel())))
    means = []
    for start in range(0, resamples, chunk):
        indices = torch.randint(n, (min(chunk, resamples - start), n), generator=generator)
        means.append(values[indices].mean(1))
    return torch.cat(means)


def _quantiles(samples, confidence):
    alpha = 1 - confidence
    q = torch.tensor([alpha / 2, 1 - alpha / 2], dtype=samples.dtype)
    return torch.quantile(samples, q, dim=0)


def bootstrap_interval(values, confidence=CONFIDENCE, resamples=RESAMPLES, seed=0):
    """The mean of ``values`` and its percentile-bootstrap interval.

    Parameters
    ----------
    values : array_like
        One score per item (N,).
    confidence : float, optional
        The interval's coverage (default 0.95).
    resamples : int, optional
        Bootstrap resamples (default 10,000).
    seed : int, optional
        The seed of the resampling.

    Returns
    -------
    Interval
        ``(mean, low, high)``.
    """
    _check(confidence, resamples)
    values = _scores(values)
    low, high = _quantiles(_resampled_means(values, resamples, seed), confidence).tolist()
    return Interval(float(values.mean()), low, high)


def bootstrap_band(curves, confidence=CONFIDENCE, resamples=1000, seed=0):
    """The pointwise percentile-bootstrap band of a mean curve.

    Parameters
    ----------
    curves : array_like
        (N, S) one curve per item.
    confidence : float, optional
        The band's pointwise coverage (default 0.95).
    resamples : int, optional
        Bootstrap resamples (default 1,000: a band for plots).
    seed : int, optional
        The seed of the resampling.

    Returns
    -------
    low, high : torch.Tensor
        (S,) each, float64.
    """
    _check(confidence, resamples)
    curves = torch.as_tensor(curves, dtype=torch.float64)
    if curves.dim() != 2 or curves.shape[0] == 0:
        raise ValueError(f'curves must be (N, S) with N > 0, got shape {tuple(curves.shape)}')
    low, high = _quantiles(_resampled_means(curves, resamples, seed), confidence)
    return low, high


def holm(p_values):
    """Holm's step-down adjusted p-values, in the order given.

    Parameters
    ----------
    p_values : sequence of float
        The unadjusted p-values of a family of tests.

    Returns
    -------
    list of float
        ``p~_(i) = max_{j <= i} min(1, (m - j + 1) p_(j))`` over the ascending order, returned in the
        input's order.
    """
    p_values = [float(p) for p in p_values]
    m = len(p_values)
    adjusted, running = [0.] * m, 0.
    for rank, index in enumerate(sorted(range(m), key=lambda i: p_values[i])):
        running = max(running, min(1., (m - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


def paired_comparisons(scores, confidence=CONFIDENCE, resamples=RESAMPLES, seed=0, alpha=0.05):
    """Every pair of methods compared on the same items: the mean difference, its bootstrap interval,
    its p-value, Holm-adjusted over the pairs.

    Parameters
    ----------
    scores : dict
        Method name -> one score per item (N,), the same N items in the same order for every method.
    confidence : float, optional
        The intervals' coverage (default 0.95).
    resamples : int, optional
        Bootstrap resamples (default 10,000), the same for every pair.
    seed : int, optional
        The seed of the resampling.
    alpha : float, optional
        The family-wise error rate of the Holm correction (default 0.05).

    Returns
    -------
    list of Comparison
        One per pair, ``a`` before ``b`` in the order of ``scores``, oriented so that ``difference >= 0``
        (the method ahead first).
    """
    _check(confidence, resamples)
    names = list(scores)
    if len(names) < 2:
        raise ValueError('paired comparisons need at least two methods')
    columns = [_scores(scores[name], f'the scores of {name!r}') for name in names]
    if len({column.numel() for column in columns}) != 1:
        sizes = {name: column.numel() for name, column in zip(names, columns)}
        raise ValueError(f'paired comparisons need the same items for every method, got counts {sizes}')
    table = torch.stack(columns, 1)
    means = _resampled_means(table, resamples, seed)  # (B, M): every method on the same resamples
    pairs = []
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            a, b = (i, j) if table[:, i].mean() >= table[:, j].mean() else (j, i)
            samples = means[:, a] - means[:, b]
            low, high = _quantiles(samples, confidence).tolist()
            below = (1 + int((samples <= 0).sum())) / (resamples + 1)
            above = (1 + int((samples >= 0).sum())) / (resamples + 1)
            pairs.append((names[a], names[b], float((table[:, a] - table[:, b]).mean()), low, high,
                          min(1., 2 * min(below, above))))
    adjusted = holm([pair[-1] for pair in pairs])
    return [Comparison(*pair, p_holm, p_holm < alpha) for pair, p_holm in zip(pairs, adjusted)]


def statistics_markdown(scores, comparisons=None, metric='ABPC', confidence=CONFIDENCE, resamples=RESAMPLES,
                        seed=0, digits=3, intervals=None):
    """Markdown: the methods ranked by their mean with its bootstrap interval, and the paired
    differences with their Holm-adjusted p-values (significant pairs marked).

    Parameters
    ----------
    scores : dict
        Method name -> one score per item (N,).
    comparisons : list of Comparison, optional
        What :func:`paired_comparisons` returned for ``scores`` (computed when omitted and there are at
        least two methods).
    metric : str, optional
        The score's name in the headers.
    confidence, resamples, seed
        As in :func:`bootstrap_interval`.
    digits : int, optional
        Significant digits of the figures.
    intervals : dict, optional
        Method name -> its :func:`bootstrap_interval` (computed when omitted).

    Returns
    -------
    str
        The two tables, separated by a blank line.
    """
    if comparisons is None and len(scores) > 1:
        comparisons = paired_comparisons(scores, confidence, resamples, seed)
    level = f'{confidence * 100:g} %'
    if intervals is None:
        intervals = {name: bootstrap_interval(values, confidence, resamples, seed) for name, values in scores.items()}
    fmt = lambda v: format(v, f'.{digits}g')  # noqa: E731
    lines = [f'| rank | method | {metric} (mean) | {level} interval |', '|---:|---|---:|---|']
    for rank, (name, interval) in enumerate(sorted(intervals.items(), key=lambda kv: -kv[1].mean), 1):
        lines.append(f'| {rank} | {name} | {fmt(interval.mean)} | [{fmt(interval.low)}, {fmt(interval.high)}] |')
    if comparisons:
        lines += ['', f'| ahead | behind | difference | {level} interval | p | p (Holm) | significant |',
                  '|---|---|---:|---|---:|---:|---|']
        for c in sorted(comparisons, key=lambda c: c.p_holm):
            lines.append(f'| {c.a} | {c.b} | {fmt(c.difference)} | [{fmt(c.low)}, {fmt(c.high)}] | {c.p:.2g} | '
                         f'{c.p_holm:.2g} | {"yes" if c.significant else "no"} |')
    return '\n'.join(lines)
