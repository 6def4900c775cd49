"""Extra peak memory (MB) of plain forward+backward, zennit's and lxt_ext's EpsilonGammaBox, and of
applying zennit's canonizer alone (part of both composites' figures: merging BatchNorm copies the weights).

    python python/benchmarks/benchmark_memory.py [vgg16 resnet50]

Each measurement runs in its own process with MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0
(large blocks are mmapped and returned at once, so VmHWM is the peak of live memory): build the model
and input, note VmRSS, reset the high-water mark (/proc/self/clear_refs), attribute once, read VmHWM.
"""
import argparse
import sys

import torch

from harness.memory import extra_peak_mb
from harness.models import cnn, epsilon_gamma_box
from harness.process import last_line

METHODS = ('plain', 'zennit', 'lxt_ext', 'canonizer')


def measure(model_name, method):
    torch.set_num_threads(2)
    model, canonizer = cnn(model_name)
    x = torch.randn(4, 3, 224, 224)
    target = torch.eye(1000)[[1, 2, 3, 4]]
    if method == 'canonizer':
        return extra_peak_mb(lambda: canonizer().apply(model))
    return extra_peak_mb(epsilon_gamma_box(model, canonizer, x, target)[method])


def main():
    if len(sys.argv) == 4 and sys.argv[1] == '--one':
        print(measure(sys.argv[2], sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('models', nargs='*', default=['vgg16', 'resnet50'])
    models = parser.parse_args().models
    print('| model | plain MB | zennit MB | lxt_ext MB | canonizer alone MB | lxt_ext / plain | lxt_ext / zennit |')
    print('|---|---|---|---|---|---|---|')
    for model in models:
        mb = {}
        for method in METHODS:
            mb[method] = float(last_line(__file__, ['--one', model, method], memory=True))
            print(f'  {model} {method}: {mb[method]:.1f} MB', file=sys.stderr)
        print(f"| {model} | {mb['plain']:.0f} | {mb['zennit']:.0f} | {mb['lxt_ext']:.0f} | {mb['canonizer']:.0f} | "
              f"{mb['lxt_ext'] / mb['plain']:.2f} | {mb['lxt_ext'] / mb['zennit']:.2f} |")


if __name__ == '__main__':
    main()
