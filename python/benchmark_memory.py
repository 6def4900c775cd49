"""Extra peak memory (MB) of plain forward+backward, zennit's and lxt_ext's EpsilonGammaBox, and of
applying zennit's canonizer alone (part of both composites' figures: merging BatchNorm copies the weights).

    python python/benchmark_memory.py [vgg16 resnet50]

Each measurement runs in its own process with MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0
(large blocks are mmapped and returned at once, so VmHWM is the peak of live memory): build the model
and input, note VmRSS, reset the high-water mark (/proc/self/clear_refs), attribute once, read VmHWM.
"""
import os
import subprocess
import sys

from peak_memory import MEMORY_ENV, extra_peak_mb

METHODS = ('plain', 'zennit', 'lxt_ext', 'canonizer')


def measure(model_name, method):
    import torch
    import torchvision
    from zennit.attribution import Gradient
    from zennit.torchvision import ResNetCanonizer, VGGCanonizer

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = getattr(torchvision.models, model_name)().eval()
    x = torch.randn(4, 3, 224, 224)
    target = torch.eye(1000)[[1, 2, 3, 4]]
    canonizer = VGGCanonizer if model_name.startswith('vgg') else ResNetCanonizer
    if method in ('zennit', 'lxt_ext'):
        module = __import__('lxt_ext.composites' if method == 'lxt_ext' else 'zennit.composites', fromlist=['x'])
        composite = module.EpsilonGammaBox(low=-3., high=3., canonizers=[canonizer()])

    def run():
        if method == 'plain':
            xg = x.clone().requires_grad_()
            torch.autograd.grad(model(xg), xg, target)
        elif method == 'canonizer':
            canonizer().apply(model)
        else:
            with Gradient(model, composite) as attributor:
                attributor(x, target)
    return extra_peak_mb(run)


def main():
    if len(sys.argv) == 4 and sys.argv[1] == '--one':
        print(measure(sys.argv[2], sys.argv[3]))
        return
    models = sys.argv[1:] or ['vgg16', 'resnet50']
    env = dict(os.environ, **MEMORY_ENV)
    print('| model | plain MB | zennit MB | lxt_ext MB | canonizer alone MB | lxt_ext / plain | lxt_ext / zennit |')
    print('|---|---|---|---|---|---|---|')
    for model in models:
        mb = {}
        for method in METHODS:
            out = subprocess.run([sys.executable, __file__, '--one', model, method], env=env, check=True,
                                 capture_output=True, text=True).stdout
            mb[method] = float(out.strip().splitlines()[-1])
            print(f'  {model} {method}: {mb[method]:.1f} MB', file=sys.stderr)
        print(f"| {model} | {mb['plain']:.0f} | {mb['zennit']:.0f} | {mb['lxt_ext']:.0f} | {mb['canonizer']:.0f} | "
              f"{mb['lxt_ext'] / mb['plain']:.2f} | {mb['lxt_ext'] / mb['zennit']:.2f} |")


if __name__ == '__main__':
    main()
