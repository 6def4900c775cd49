"""GPU benchmarks of lxt_ext (one CUDA device): Vision Transformer, LLaMA-style decoder, attention alone.

    python python/benchmarks/benchmark_gpu.py [--quick] [--lxt-path DIR]

Prints markdown tables. Every method of a table is timed in the same process, interleaved (a warm-up,
then the median of ``--repeats`` rounds; ``torch.cuda.synchronize`` around each call), with the extra
peak memory of one call (``torch.cuda.max_memory_allocated`` above what was allocated before it).

- ``vit``: torchvision vit_b_16 (random weights, head re-initialised), batch 64, float32 and bfloat16:
  plain forward+backward, ViTEpsilon (AttnLRP), ViTGamma (CP-LRP); LXT 2.1's published gamma recipe
  when ``--lxt-path`` names a directory holding ``lxt`` and what it needs (transformers 4.x), run in a
  process of its own with that directory first on PYTHONPATH. Images per second and the ratio to plain.
- ``decoder``: python/benchmarks/benchmark_language.py's LLaMA-style decoder (8 layers, width 512, GQA 8/2) at
  4k and 16k tokens, AttnLRP (``LanguageTransformer``) vs plain forward+backward, bfloat16.
- ``attention``: attention alone, batch 1, 4 heads, D = 64, 1k-64k tokens (``--quick``: 1k-16k),
  forward+backward: lxt_ext AttnLRP (the default rule: ATen's kernels), lxt_ext's own kernels
  (``backend='lxt_ext'``, up to 16k tokens), plain SDPA; bfloat16 and float32.
"""
import argparse
import os
import subprocess
import sys

import torch

from harness.timing import interleaved_medians

HERE = os.path.dirname(os.path.abspath(__file__))  # harness and benchmark_language.py, for the LXT child too
ROOT = os.path.dirname(os.path.dirname(HERE))


def synced(run):
    def call():
        run()
        torch.cuda.synchronize()
    return call


def peak_mb(run):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2 ** 20


def measure(runs, repeats):
    """``{name: (seconds, extra peak MB)}``."""
    seconds = interleaved_medians({name: synced(run) for name, run in runs.items()}, repeats)
    return {name: (seconds[name], peak_mb(run)) for name, run in runs.items()}


def vit_runs(dtype, batch):
    from harness.models import attribution, plain, vit
    from lxt_ext.composites import ViTEpsilon, ViTGamma
    model = vit().to('cuda', dtype)
    x = torch.randn(batch, 3, 224, 224, device='cuda', dtype=dtype)
    target = torch.eye(1000, device='cuda', dtype=dtype)[torch.arange(batch) % 1000]
    return {'plain': plain(model, x, target), 'ViTEpsilon': attribution(model, ViTEpsilon(), x, target),
            'ViTGamma': attribution(model, ViTGamma(), x, target)}


_LXT_VIT = r'''
import sys, torch
from lxt.efficient import monkey_patch, monkey_patch_zennit
from torchvision.models import vision_transformer
monkey_patch(vision_transformer); monkey_patch_zennit()
import zennit.rules as z
from zennit.composites import LayerMapComposite
sys.path.insert(0, sys.argv[3])
from harness.timing import interleaved_medians
from harness.models import vit
dtype, batch, repeats = getattr(torch, sys.argv[1]), int(sys.argv[2]), int(sys.argv[4])
model = vit().to('cuda', dtype)
x = torch.randn(batch, 3, 224, 224, device='cuda', dtype=dtype)
target = torch.eye(1000, device='cuda', dtype=dtype)[torch.arange(batch) % 1000]
composite = LayerMapComposite([(torch.nn.Conv2d, z.Gamma(0.25)), (torch.nn.Linear, z.Gamma(0.05))])
def run():
    xg = x.clone().requires_grad_()
    with composite.context(model) as modified:
        modified(xg).backward(target)
    torch.cuda.synchronize()
seconds = interleaved_medians({'lxt': run}, repeats)['lxt']
torch.cuda.reset_peak_memory_stats(); before = torch.cuda.memory_allocated(); run()
print(seconds, (torch.cuda.max_memory_allocated() - before) / 2 ** 20)
'''


def lxt_vit(dtype, batch, repeats, lxt_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [lxt_path, ROOT, os.environ.get('PYTHONPATH')])))
    out = subprocess.run([sys.executable, '-c', _LXT_VIT, str(dtype).split('.')[-1], str(batch), HERE, str(repeats)],
                         env=env, capture_output=True, text=True)
    if out.returncode != 0:
        return None, out.stderr.strip().splitlines()[-1:]
    seconds, mb = (float(x) for x in out.stdout.split()[-2:])
    return (seconds, mb), None


def table_vit(args):
    print('### vit_b_16, batch 64\n')
    print('| dtype | method | s per batch | images/s | images/s / plain | extra peak MB |')
    print('|---|---|---|---|---|---|')
    for dtype in (torch.float32, torch.bfloat16):
        results = measure(vit_runs(dtype, args.batch), args.repeats)
        if args.lxt_path:
            lxt, error = lxt_vit(dtype, args.batch, args.repeats, args.lxt_path)
            if lxt:
                results['LXT 2.1 gamma recipe'] = lxt
            else:
                print(f'LXT failed: {error}', file=sys.stderr)
        plain = results['plain'][0]
        for name, (seconds, mb) in results.items():
            print(f'| {str(dtype)[6:]} | {name} | {seconds:.4f} | {args.batch / seconds:.1f} | {plain / seconds:.2f} '
                  f'| {mb:.0f} |', flush=True)
    print()


def table_decoder(args):
    import benchmark_language
    from lxt_ext.attribution import Explainer
    from lxt_ext.composites import LanguageTransformer
    print('### LLaMA-style decoder (8 layers, width 512, GQA 8/2), AttnLRP, bfloat16\n')
    print('| tokens | method | s | time / plain | extra peak MB |')
    print('|---|---|---|---|---|')
    for tokens in ((4096,) if args.quick else (4096, 16384)):
        model, embeds = benchmark_language.workload(tokens)
        model, embeds = model.to('cuda', torch.bfloat16), embeds.to('cuda', torch.bfloat16)

        def logits(x):
            return model(inputs_embeds=x, logits_to_keep=1).logits[:, -1]

        def seed(out):
            return torch.zeros_like(out).scatter_(-1, out.argmax(-1, keepdim=True), 1.0)

        def plain():
            x = embeds.clone().requires_grad_()
            out = logits(x)
            out.backward(seed(out))

        composite = LanguageTransformer(attention='attnlrp')

        def lrp():
            with Explainer(model, composite, forward=lambda m, x: logits(x)) as attributor:
                attributor(embeds, lambda out: seed(out) * out)  # the seed is relevance: the top logit

        results = measure({'plain': plain, 'lxt_ext AttnLRP': lrp}, args.repeats)
        for name, (seconds, mb) in results.items():
            print(f'| {tokens} | {name} | {seconds:.3f} | {seconds / results["plain"][0]:.2f} | {mb:.0f} |', flush=True)
        del model, embeds
    print()


def table_attention(args):
    from lxt_ext.attention import attention_lrp
    print('### attention alone, batch 1, 4 heads, D = 64, forward+backward\n')
    print('| dtype | N | method | s | time / SDPA | extra peak MB |')
    print('|---|---|---|---|---|---|')
    lengths = [1024, 4096, 16384] if args.quick else [1024, 4096, 16384, 65536]
    for dtype in (torch.bfloat16, torch.float32):
        for n in lengths:
            q, k, v = (torch.randn(1, 4, n, 64, device='cuda', dtype=dtype, requires_grad=True) for _ in range(3))
            g = torch.randn(1, 4, n, 64, device='cuda', dtype=dtype)

            def run(f):
                def call():
                    q.grad = k.grad = v.grad = None
                    f(q, k, v).backward(g)
                return call

            runs = {'sdpa': run(torch.nn.functional.scaled_dot_product_attention),
                    'lxt_ext AttnLRP': run(lambda q, k, v: attention_lrp(q, k, v))}
            if n <= 16384:
                runs['lxt_ext own kernels'] = run(lambda q, k, v: attention_lrp(q, k, v, backend='lxt_ext'))
            results = measure(runs, args.repeats)
            for name, (seconds, mb) in results.items():
                print(f'| {str(dtype)[6:]} | {n} | {name} | {seconds:.4f} | {seconds / results["sdpa"][0]:.2f} '
                      f'| {mb:.0f} |', flush=True)
    print()


TABLES = {'vit': table_vit, 'decoder': table_decoder, 'attention': table_attention}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--tables', nargs='+', default=list(TABLES), choices=TABLES)
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--batch', type=int, default=64)
    parser.add_argument('--quick', action='store_true', help='shorter sequences (a smoke run)')
    parser.add_argument('--lxt-path', help='a directory with LXT 2.1 and transformers 4.x to put first on PYTHONPATH')
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit('benchmark_gpu.py needs a CUDA device')
    print(f'{torch.cuda.get_device_name()}, torch {torch.__version__}\n')
    for name in args.tables:
        TABLES[name](args)


if __name__ == '__main__':
    main()
