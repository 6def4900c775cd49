"""The comparison statistics against independent oracles: scipy.stats.bootstrap's percentile intervals
(another generator, so equal within the resampling's Monte Carlo error), a t interval where the mean is
normal, Holm's correction written out on a hand-worked family, and the coverage of known differences."""
import numpy as np
import pytest
import torch
from scipy import stats

from lxt_ext.evaluation.statistics import (Comparison, bootstrap_band, bootstrap_interval, holm, paired_comparisons,
                                           statistics_markdown)


def test_interval_matches_scipy_percentile_bootstrap():
    values = np.random.default_rng(1).gamma(2.0, 1.5, size=400)  # skewed, as ABPC per image is
    ours = bootstrap_interval(values, resamples=20000, seed=3)
    theirs = stats.bootstrap((values,), np.mean, confidence_level=0.95, n_resamples=20000, method='percentile',
                             random_state=np.random.default_rng(4)).confidence_interval
    se = values.std(ddof=1) / len(values) ** 0.5
    assert ours.mean == pytest.approx(values.mean(), rel=1e-12)
    # two independent Monte Carlo estimates of the 2.5 % / 97.5 % quantiles agree to a few % of the s.e.
    assert ours.low == pytest.approx(theirs.low, abs=0.05 * se)
    assert ours.high == pytest.approx(theirs.high, abs=0.05 * se)


def test_interval_is_the_t_interval_for_a_normal_mean():
    values = np.random.default_rng(2).normal(3.0, 2.0, size=2000)
    ours = bootstrap_interval(values, resamples=20000)
    low, high = stats.t.interval(0.95, len(values) - 1, loc=values.mean(), scale=stats.sem(values))
    se = stats.sem(values)
    assert ours.low == pytest.approx(low, abs=0.06 * se) and ours.high == pytest.approx(high, abs=0.06 * se)


def test_interval_is_deterministic_in_its_seed():
    values = torch.randn(50, generator=torch.Generator().manual_seed(0))
    assert bootstrap_interval(values, seed=5) == bootstrap_interval(values, seed=5)
    assert bootstrap_interval(values, seed=5) != bootstrap_interval(values, seed=6)


def test_holm_hand_worked():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 -> running max 0.02, 0.03, 0.06, 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # min(1, 2 * 0.5) = 1, and the running maximum keeps 1
    assert holm([]) == []


def test_paired_differences_separate_what_pairing_separates():
    # A is B plus a small shift, with large shared per-item noise: unpaired intervals overlap, the paired
    # difference is clearly positive; C equals B up to tiny noise: not separable
    rng = np.random.default_rng(7)
    base = rng.normal(0, 5, size=300)
    scores = {'B': base, 'A': base + 0.5 + rng.normal(0, 0.5, size=300), 'C': base + rng.normal(0, 0.5, size=300)}
    a, b = bootstrap_interval(scores['A']), bootstrap_interval(scores['B'])
    assert a.low < b.high  # unpaired: overlapping
    pairs = {(c.a, c.b): c for c in paired_comparisons(scores, resamples=5000)}
    assert set(pairs) == {('A', 'B'), ('A', 'C'), ('C', 'B')} or set(pairs) == {('A', 'B'), ('A', 'C'), ('B', 'C')}
    ab = pairs[('A', 'B')]
    assert ab.difference == pytest.approx((scores['A'] - scores['B']).mean())
    assert 0 < ab.low < ab.difference < ab.high and ab.significant and ab.p_holm <= 3 * ab.p + 1e-12
    bc = pairs.get(('C', 'B')) or pairs[('B', 'C')]
    assert bc.difference >= 0 and bc.low < 0 < bc.high and not bc.significant
    # the paired interval is scipy's percentile interval of the per-item differences
    d = scores['A'] - scores['B']
    theirs = stats.bootstrap((d,), np.mean, n_resamples=20000, method='percentile',
                             random_state=np.random.default_rng(0)).confidence_interval
    se = d.std(ddof=1) / len(d) ** 0.5
    assert ab.low == pytest.approx(theirs.low, abs=0.1 * se) and ab.high == pytest.approx(theirs.high, abs=0.1 * se)
    # Holm over the three pairs, written out
    comparisons = list(pairs.values())
    assert [c.p_holm for c in comparisons] == pytest.approx(holm([c.p for c in comparisons]))


def test_p_value_inverts_the_interval():
    rng = np.random.default_rng(11)
    for shift in (0.0, 0.05, 0.1, 0.2, 0.4):
        base = rng.normal(0, 1, size=200)
        (c,) = paired_comparisons({'x': base + shift + rng.normal(0, 1, size=200), 'y': base}, resamples=4000)
        assert isinstance(c, Comparison)
        # the 95 % interval excludes zero exactly when p < 0.05 (away from the boundary's granularity)
        if abs(c.p - 0.05) > 0.01:
            assert (c.low > 0 or c.high < 0) == (c.p < 0.05)


def test_coverage_of_a_known_mean():
    # the 95 % interval covers the true mean about 95 % of the time (binomial bounds for 200 trials)
    rng = np.random.default_rng(12)
    hits = 0
    for i in range(200):
        interval = bootstrap_interval(rng.exponential(1.0, size=100), resamples=1000, seed=i)
        hits += interval.low <= 1.0 <= interval.high
    assert 176 <= hits <= 197


def test_markdown_ranks_and_marks():
    rng = np.random.default_rng(3)
    base = rng.normal(0, 1, size=100)
    text = statistics_markdown({'low': base, 'high': base + 1}, metric='ABPC', resamples=2000)
    lines = text.splitlines()
    assert lines[0].startswith('| rank | method | ABPC')
    assert lines[2].startswith('| 1 | high |') and lines[3].startswith('| 2 | low |')
    assert '| high | low | 1 |' in text and text.rstrip().endswith('| yes |')


@pytest.mark.parametrize('scores, message', [
    ({'a': [1.0, 2.0]}, 'at least two'),
    ({'a': [1.0, 2.0], 'b': [1.0]}, 'same items'),
    ({'a': [1.0, float('nan')], 'b': [1.0, 2.0]}, "NaN or infinite values"),
    ({'a': [], 'b': []}, 'empty'),
])
def test_bad_input_named(scores, message):
    with pytest.raises(ValueError, match=message):
        paired_comparisons(scores)


def test_bad_options_named():
    with pytest.raises(ValueError, match='confidence'):
        bootstrap_interval([1.0, 2.0], confidence=95)
    with pytest.raises(ValueError, match='resamples'):
        bootstrap_interval([1.0, 2.0], resamples=0)


def test_band_is_each_steps_percentile_interval():
    rng = np.random.default_rng(5)
    curves = rng.normal(0, 1, size=(300, 4)).cumsum(1)
    low, high = bootstrap_band(curves, resamples=4000, seed=1)
    assert low.shape == high.shape == (4,)
    for k in range(4):
        theirs = stats.bootstrap((curves[:, k],), np.mean, n_resamples=4000, method='percentile',
                                 random_state=np.random.default_rng(k)).confidence_interval
        se = curves[:, k].std(ddof=1) / 300 ** 0.5
        assert float(low[k]) == pytest.approx(theirs.low, abs=0.1 * se)
        assert float(high[k]) == pytest.approx(theirs.high, abs=0.1 * se)
    with pytest.raises(ValueError, match='curves must be'):
        bootstrap_band(np.zeros(5))
