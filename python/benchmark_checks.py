"""Time of lxt_ext's per-layer NaN/Inf checks (lxt_ext.checks) on the CPU: attributions with the checks
on and off (``lxt_ext.checks.applies`` patched), interleaved in one process, median of ``--repeats``.

    .venv/bin/python python/benchmark_checks.py resnet50 vit_b_16
"""
import argparse
import statistics
import time

import torch
import torchvision
from zennit.attribution import Gradient
from zennit.torchvision import ResNetCanonizer

import lxt_ext.checks as checks
import lxt_ext.composites as composites


def build(name):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    if name.startswith('vit'):
        torch.nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision zero-initialises the head
        return model, composites.ViTEpsilon
    return model, lambda: composites.EpsilonGammaBox(low=-3., high=3., canonizers=[ResNetCanonizer()])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('models', nargs='+', choices=['resnet50', 'vit_b_16'])
    parser.add_argument('--repeats', type=int, default=4)
    parser.add_argument('--batch', type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(2)
    applies = checks.applies
    print('| model | checks on (s) | checks off (s) | on / off |\n|---|---|---|---|')
    for name in args.models:
        model, composite = build(name)
        x = torch.randn(args.batch, 3, 224, 224)
        seed = torch.eye(1000)[torch.arange(args.batch)]

        def run():
            with Gradient(model, composite()) as attributor:
                start = time.perf_counter()
                attributor(x, seed)
                return time.perf_counter() - start

        run()  # warm-up
        times = {'on': [], 'off': []}
        try:
            for _ in range(args.repeats):
                for mode in times:
                    checks.applies = applies if mode == 'on' else (lambda tensor: False)
                    times[mode].append(run())
        finally:
            checks.applies = applies
        on, off = statistics.median(times['on']), statistics.median(times['off'])
        print(f'| {name} | {on:.2f} | {off:.2f} | {on / off:.2f} |')


if __name__ == '__main__':
    main()
