"""What the operation rules (``lxt_ext.operations``) cost: a registered composite with them and without them,
alternating in one process, on the decoder and the ViT of the other benchmarks (2 threads).

    python python/benchmarks/benchmark_operations.py [--rounds 21] [--models decoder vit]

``decoder``: benchmark_language.py's LLaMA-style decoder (8 layers, width 512, GQA 8/2) at ``--tokens`` tokens,
``LanguageTransformer`` (AttnLRP), relevance of the top logit w.r.t. the input embeddings; ``vit``:
torchvision's vit_b_16, batch 4, ``ViTEpsilon`` (AttnLRP), zennit's ``Gradient``. "without" registers the
composite with the operation rules replaced by a hook that does nothing (no mode, no module hooks): what the
composites were before the rules existed. Each round times one attribution of each, in alternating order; the
ratio with / without of each round gives the median and its 95 % interval (order statistics of the ratios,
binomial: no assumption about their distribution; its exact coverage is printed: 97.3 % for 21 rounds). One
warm-up of each first.
"""
import argparse
import math
import statistics
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit('/', 1)[0])
from harness.models import vit  # noqa: E402

import lxt_ext.composites.transformer as composites  # noqa: E402
from lxt_ext.core import RuleHook  # noqa: E402


class _NoOperationRules(RuleHook):
    """Registers nothing: the composite without the operation rules."""
    marks = False
    checked = False

    def __init__(self, *args, **kwargs):
        super().__init__()


def decoder_run(tokens):
    from benchmark_language import attribution
    return attribution('lxt_ext', tokens)


def vit_run():
    from zennit.attribution import Gradient
    torch.manual_seed(0)
    model, x = vit(), torch.randn(4, 3, 224, 224)
    target = torch.eye(1000)[list(range(4))]

    def run():
        with Gradient(model, composites.ViTEpsilon()) as attributor:
            return attributor(x, target)[1]
    return run


def timed(run, with_rules):
    composites.OperationRules = RULES if with_rules else _NoOperationRules
    try:
        start = time.perf_counter()
        run()
        return time.perf_counter() - start
    finally:
        composites.OperationRules = RULES


RULES = composites.OperationRules


def median_interval(values, level=0.95):
    """The median of ``values``, the order-statistic interval that holds the true median with probability >=
    ``level`` (the whole range where too few values cannot), and that probability."""
    values, n = sorted(values), len(values)
    # the largest k with P(Binomial(n, 1/2) < k) <= (1 - level) / 2: [values[k - 1], values[n - k]] covers the median
    k, tail = 0, 0.
    while True:
        next_tail = tail + math.comb(n, k) / 2 ** n
        if next_tail > (1 - level) / 2:
            break
        tail, k = next_tail, k + 1
    k = max(k, 1)
    coverage = 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2 ** n
    return statistics.median(values), values[k - 1], values[n - k], coverage


def measure(run, rounds):
    timed(run, True), timed(run, False)  # warm-up
    ratios, times = [], {True: [], False: []}
    for round in range(rounds):
        order = (True, False) if round % 2 == 0 else (False, True)
        seconds = {with_rules: timed(run, with_rules) for with_rules in order}
        for with_rules, value in seconds.items():
            times[with_rules].append(value)
        ratios.append(seconds[True] / seconds[False])
    return median_interval(ratios), statistics.median(times[True]), statistics.median(times[False])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--rounds', type=int, default=21)
    parser.add_argument('--tokens', type=int, default=2048)
    parser.add_argument('--models', nargs='+', default=['decoder', 'vit'], choices=['decoder', 'vit'])
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    print(f'| workload | with the rules (s) | without (s) | ratio, median of {args.rounds} rounds | interval (coverage) |')
    print('|---|---|---|---|---|')
    for name in args.models:
        if name == 'decoder':
            label, run = f'LLaMA-style decoder, {args.tokens} tokens, LanguageTransformer (AttnLRP)', \
                decoder_run(args.tokens)
        else:
            label, run = 'vit_b_16, batch 4, ViTEpsilon (AttnLRP)', vit_run()
        (ratio, low, high, coverage), with_rules, without = measure(run, args.rounds)
        print(f'| {label} | {with_rules:.3f} | {without:.3f} | {ratio:.3f} | {low:.3f} - {high:.3f} '
              f'({100 * coverage:.1f} %) |', flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
