"""Median time of plain forward+backward, zennit's and lxt_ext's EpsilonGammaBox, measured in one run.

    python python/benchmarks/benchmark_time.py [vgg16 resnet50] [--repeats 3]

Random weights, batch 4, 224x224, 2 threads. One warm-up call of each method, then ``--repeats`` rounds
with the three methods interleaved, so that load from other processes hits all three alike; prints a
markdown row per model (medians and their ratios).
"""
import argparse

import torch

from harness.models import cnn, epsilon_gamma_box
from harness.timing import interleaved_medians


def median_times(name, repeats):
    model, canonizer = cnn(name)
    x = torch.randn(4, 3, 224, 224)
    target = torch.eye(1000)[[1, 2, 3, 4]]
    return interleaved_medians(epsilon_gamma_box(model, canonizer, x, target), repeats)


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
