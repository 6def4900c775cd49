"""Median time of plain forward+backward, zennit's and lxt_ext's EpsilonGammaBox, measured in one run.

    python python/benchmark_time.py [vgg16 resnet50] [--repeats 3]

Random weights, batch 4, 224x224, 2 threads. One warm-up call of each method, then ``--repeats`` rounds
with the three methods interleaved, so that load from other processes hits all three alike; prints a
markdown row per model (medians and their ratios).
"""
import argparse
import statistics
import time

import torch
import torchvision
import zennit.composites
from zennit.attribution import Gradient
from zennit.torchvision import ResNetCanonizer, VGGCanonizer

import lxt_ext.composites

CANONIZERS = {'vgg': VGGCanonizer, 'resnet': ResNetCanonizer}


def methods(model, canonizer):
    x = torch.randn(4, 3, 224, 224)
    target = torch.eye(1000)[[1, 2, 3, 4]]

    def plain():
        xg = x.clone().requires_grad_()
        torch.autograd.grad(model(xg), xg, target)

    def attribution(composites):
        composite = composites.EpsilonGammaBox(low=-3., high=3., canonizers=[canonizer()])

        def run():
            with Gradient(model, composite) as attributor:
                attributor(x, target)
        return run

    return {'plain': plain, 'zennit': attribution(zennit.composites), 'lxt_ext': attribution(lxt_ext.composites)}


def median_times(name, repeats):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)().eval()
    canonizer = next(c for prefix, c in CANONIZERS.items() if name.startswith(prefix))
    runs = methods(model, canonizer)
    times = {method: [] for method in runs}
    for run in runs.values():
        run()
    for _ in range(repeats):
        for method, run in runs.items():
            start = time.perf_counter()
            run()
            times[method].append(time.perf_counter() - start)
    return {method: statistics.median(values) for method, values in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('models', nargs='*', default=['vgg16', 'resnet50'])
    parser.add_argument('--repeats', type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    print('| model | plain fwd+bwd | zennit | lxt_ext | zennit / plain | lxt_ext / plain | speed-up vs zennit |')
    print('|---|---|---|---|---|---|---|')
    for name in args.models:
        med = median_times(name, args.repeats)
        print(f"| {name} | {med['plain']:.2f} s | {med['zennit']:.2f} s | {med['lxt_ext']:.2f} s | "
              f"{med['zennit'] / med['plain']:.2f} | {med['lxt_ext'] / med['plain']:.2f} | "
              f"{med['zennit'] / med['lxt_ext']:.2f}x |", flush=True)


if __name__ == '__main__':
    main()
