"""Time and extra peak memory of relevance for torchvision's vit_b_16 (batch 4, 224x224, 2 threads).

    python python/benchmarks/benchmark_vit.py [--repeats 3] [--interleaved]

Methods: plain forward+backward (gradient w.r.t. the input); lxt_ext ViTEpsilon (fused epsilon on
every Linear and the patch embedding, AttnLRP); lxt_ext ViTGamma (the published recipe, gamma on
ALL Linear including the attention projections, CP-LRP); LXT 2.1 + zennit with the published recipe
(``monkey_patch(vision_transformer)``, ``monkey_patch_zennit``, zennit Gamma 0.25 on Conv2d and 0.05
on Linear; LXT leaves the attention projections at the plain gradient); LXT 2.1 + zennit Epsilon.
LXT runs in its oracle environment (``.oracle`` first on PYTHONPATH, see tests/lxt_oracle.py).

Every measurement is a process of its own. Time: a warm-up, then the median of ``--repeats``
attributions. Memory (``MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0``, so that freed blocks
leave RSS at once): VmRSS after building model and input, reset the high-water mark
(/proc/self/clear_refs), one attribution, VmHWM minus that VmRSS.
"""
import argparse
import os
import sys

import torch

from harness.memory import extra_peak_mb
from harness.models import attribution as gradient_run, plain, vit
from harness.process import last_line
from harness.timing import interleaved_medians

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # python/benchmarks/ is two below
METHODS = ('plain', 'lxt_ext_epsilon', 'lxt_ext_gamma', 'lxt_gamma', 'lxt_epsilon')
LXT_METHODS = ('lxt_gamma', 'lxt_epsilon')
LABELS = {
    'plain': 'plain forward+backward',
    'lxt_ext_epsilon': 'lxt_ext ViTEpsilon (AttnLRP)',
    'lxt_ext_gamma': 'lxt_ext ViTGamma (gamma on all Linear, CP)',
    'lxt_gamma': 'LXT 2.1 + zennit, published gamma recipe',
    'lxt_epsilon': 'LXT 2.1 + zennit Epsilon',
}


def attribution(method, batch):
    """A function running one attribution of ``method`` on vit_b_16 (random weights, head re-initialised)."""
    torch.set_num_threads(2)
    if method in LXT_METHODS:
        from lxt.efficient import monkey_patch, monkey_patch_zennit
        from torchvision.models import vision_transformer
        monkey_patch(vision_transformer)  # patches torch.nn classes of this process only
        monkey_patch_zennit()
    model = vit()
    x = torch.randn(batch, 3, 224, 224)
    target = torch.eye(1000)[list(range(batch))]

    if method == 'plain':
        return plain(model, x, target)
    if method.startswith('lxt_ext'):
        from lxt_ext.composites import ViTEpsilon, ViTGamma
        return gradient_run(model, ViTEpsilon() if method == 'lxt_ext_epsilon' else ViTGamma(), x, target)
    import zennit.rules as z
    from zennit.composites import LayerMapComposite
    if method == 'lxt_gamma':
        rules = [(torch.nn.Conv2d, z.Gamma(0.25)), (torch.nn.Linear, z.Gamma(0.05))]
    else:
        rules = [(torch.nn.Conv2d, z.Epsilon(1e-6)), (torch.nn.Linear, z.Epsilon(1e-6))]
    composite = LayerMapComposite(rules)

    def run():
        xg = x.clone().requires_grad_()
        with composite.context(model) as modified:
            modified(xg).backward(target)
        return xg * xg.grad
    return run


def measure(method, kind, batch, repeats):
    run = attribution(method, batch)
    if kind == 'memory':
        return extra_peak_mb(run) / 1024
    return interleaved_medians({method: run}, repeats)[method]


def child(method, kind, batch, repeats):
    """Seconds or GB from a fresh process; LXT's methods with the oracle environment first on PYTHONPATH."""
    env = {}
    if method in LXT_METHODS:
        oracle = os.path.join(ROOT, '.oracle')
        env['PYTHONPATH'] = os.pathsep.join(filter(None, [oracle, os.environ.get('PYTHONPATH')]))
    return float(last_line(__file__, ['--one', method, kind, batch, repeats], memory=kind == 'memory', env=env))


def interleaved(methods, batch, repeats):
    """Times of lxt_ext's methods and plain in this one process, interleaved (a ratio under shared load)."""
    runs = {method: attribution(method, batch) for method in methods}
    seconds = interleaved_medians(runs, repeats)
    print('| method | time (s) | time / plain |')
    print('|---|---|---|')
    for method, value in seconds.items():
        ratio = f'{value / seconds["plain"]:.3f}' if 'plain' in seconds else '-'
        print(f'| {LABELS[method]} | {value:.2f} | {ratio} |')
    print(f'load average after: {os.getloadavg()[0]:.1f}')


def main():
    if len(sys.argv) == 6 and sys.argv[1] == '--one':
        print(measure(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--batch', type=int, default=4)
    parser.add_argument('--methods', nargs='+', default=list(METHODS), choices=METHODS)
    parser.add_argument('--interleaved', action='store_true',
                        help="time plain and lxt_ext's methods interleaved in one process (no memory, no LXT)")
    args = parser.parse_args()
    if args.interleaved:
        interleaved([m for m in args.methods if m not in LXT_METHODS], args.batch, args.repeats)
        return
    results = {}
    for method in args.methods:
        seconds = child(method, 'time', args.batch, args.repeats)
        gigabytes = child(method, 'memory', args.batch, args.repeats)
        results[method] = seconds, gigabytes
        print(f'  {method}: {seconds:.2f} s, {gigabytes:.2f} GB', file=sys.stderr)
    plain = results.get('plain')
    print('| method | time (s) | extra peak memory (GB) | time / plain | memory / plain |')
    print('|---|---|---|---|---|')
    for method, (seconds, gigabytes) in results.items():
        ratios = f'{seconds / plain[0]:.2f} | {gigabytes / plain[1]:.2f}' if plain else '- | -'
        print(f'| {LABELS[method]} | {seconds:.2f} | {gigabytes:.2f} | {ratios} |')


if __name__ == '__main__':
    main()
