"""Where lxt_ext's EpsilonGammaBox reaches its peak memory: at each convolution's forward and backward
(before the layer's backward runs), the resident memory above the start and the peak since the
previous mark.

    MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0 \
        python python/benchmarks/memory_by_layer.py [resnet50] [--top 12]

(the allocator settings of benchmark_memory.py, so that resident memory is live memory). Random weights,
batch 4, 224x224, 2 threads. The interval with the highest peak ends at the mark after the layer whose
work reached it; its peak minus the resident memory at its start is what that work allocated on top of
what is held.
"""
import argparse

import torch
from zennit.attribution import Gradient

import lxt_ext.composites
from harness.memory import reset_peak, status_kb
from harness.models import cnn


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('model', nargs='?', default='resnet50')
    parser.add_argument('--top', type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, canonizer = cnn(args.model)
    composite = lxt_ext.composites.EpsilonGammaBox(low=-3., high=3., canonizers=[canonizer()])
    x = torch.randn(4, 3, 224, 224)
    target = torch.eye(1000)[[1, 2, 3, 4]]

    start = status_kb('VmRSS')
    marks = []

    def mark(label):
        def hook(*_):
            marks.append(((status_kb('VmHWM') - start) / 1024, (status_kb('VmRSS') - start) / 1024, label))
            reset_peak()
        return hook

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            module.register_forward_hook(mark(f'forward  {name}'))
            module.register_full_backward_pre_hook(mark(f'backward {name}'))
    reset_peak()
    with Gradient(model, composite) as attributor:
        attributor(x, target)
    mark('the end of the attribution')()
    print(f'peak: {max(peak for peak, _, _ in marks):.0f} MB above the start. Highest intervals:')
    print('  peak since previous mark | resident at mark | mark')
    for peak, resident, label in sorted(marks, reverse=True)[:args.top]:
        print(f'  {peak:6.0f} MB | {resident:6.0f} MB | {label}')


if __name__ == '__main__':
    main()
