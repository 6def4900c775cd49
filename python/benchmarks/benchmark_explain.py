"""Images/s of ``lxt-ext explain`` against the same composite in a plain loop over preloaded tensors, and
against a hand-written loop over LXT 2.1's published recipe (torchvision vit_b_16, random weights).

    python python/benchmarks/benchmark_explain.py [--images 32] [--batches 4 16] [--threads 2] [--device cpu]
                                       [--dtype float32] [--methods vit_epsilon vit_gamma lxt_gamma]

For each batch size and method, each in a fresh process with ``--threads`` torch threads:
- ``command``: ``python -m lxt_ext explain`` on a folder of ``--images`` 224 x 224 PNGs (2 DataLoader
  workers decoding, heatmap PNGs written by the background writers), its own images/s (model building
  excluded, first batch included);
- ``loop``: ``lxt_ext.Explainer`` over the same images already decoded into one tensor, nothing written;
- ``lxt_gamma`` (LXT 2.1's recipe: ``monkey_patch(vision_transformer)``, ``monkey_patch_zennit()``,
  zennit Gamma 0.25 on Conv2d and 0.05 on Linear, run in the ``.oracle`` environment) in the same loop.
Prints a markdown table; the ratio command / loop is what I/O and writing cost.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # python/benchmarks/ is two below
COMPOSITES = ('vit_epsilon', 'vit_gamma')


def write_images(folder, count):
    from PIL import Image

    rng = np.random.default_rng(0)
    for index in range(count):
        Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)).save(
            os.path.join(folder, f'{index:04d}.png'))


def load_images(folder):
    from PIL import Image

    images = []
    for name in sorted(os.listdir(folder)):
        with Image.open(os.path.join(folder, name)) as image:
            images.append(torch.from_numpy(np.asarray(image.convert('RGB'))).permute(2, 0, 1).float() / 255)
    return torch.stack(images)


def loop(method, folder, batch, threads, device, dtype):
    """Images/s of an in-process loop over preloaded images (``method``: a composite name or lxt_gamma)."""
    torch.set_num_threads(threads)
    dtype = getattr(torch, dtype)
    images = load_images(folder)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x_all = ((images - mean) / std).to(device=device, dtype=dtype)
    if method == 'lxt_gamma':
        from lxt.efficient import monkey_patch, monkey_patch_zennit
        from torchvision.models import vision_transformer
        monkey_patch(vision_transformer)
        monkey_patch_zennit()
    from lxt_ext.cli.models import load_torchvision
    model = load_torchvision('vit_b_16').model.to(device=device, dtype=dtype)
    start = time.perf_counter()
    if method == 'lxt_gamma':
        import zennit.rules as z
        from zennit.composites import LayerMapComposite
        composite = LayerMapComposite([(torch.nn.Conv2d, z.Gamma(0.25)), (torch.nn.Linear, z.Gamma(0.05))])
        with composite.context(model) as modified:
            for x in x_all.split(batch):
                xg = x.clone().requires_grad_()
                logits = modified(xg)
                logits.backward(torch.nn.functional.one_hot(logits.argmax(1), logits.shape[1]).to(logits))
                (xg * xg.grad).sum(1).cpu()
    else:
        from lxt_ext import Explainer
        from lxt_ext.cli.models import VIT_COMPOSITES
        with Explainer(model, VIT_COMPOSITES[method]()) as explainer:
            for x in x_all.split(batch):
                explainer(x).relevance.sum(1).cpu()
    if device.startswith('cuda'):
        torch.cuda.synchronize()
    return len(x_all) / (time.perf_counter() - start)


def command(method, folder, batch, threads, device, dtype):
    with tempfile.TemporaryDirectory() as out:
        process = subprocess.run(
            [sys.executable, '-m', 'lxt_ext', 'explain', folder, '--model', 'vit_b_16', '--composite', method,
             '--batch-size', str(batch), '--threads', str(threads), '--workers', '2', '--device', device,
             '--dtype', dtype, '--out', out, '--quiet'], capture_output=True, text=True, check=True)
    return float(re.search(r'\(([\d.]+) images/s', process.stdout).group(1))


def child(kind, method, folder, batch, args):
    env = dict(os.environ)
    if method == 'lxt_gamma':
        env['PYTHONPATH'] = os.pathsep.join(filter(None, [os.path.join(ROOT, '.oracle'), env.get('PYTHONPATH')]))
    out = subprocess.run([sys.executable, __file__, '--one', kind, method, folder, str(batch), str(args.threads),
                          args.device, args.dtype], env=env, capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def main():
    if sys.argv[1:2] == ['--one']:
        kind, method, folder, batch, threads, device, dtype = sys.argv[2:]
        run = command if kind == 'command' else loop
        print(run(method, folder, int(batch), int(threads), device, dtype))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--images', type=int, default=32)
    parser.add_argument('--batches', type=int, nargs='+', default=[4, 16])
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
    parser.add_argument('--methods', nargs='+', default=list(COMPOSITES) + ['lxt_gamma'],
                        choices=list(COMPOSITES) + ['lxt_gamma'])
    args = parser.parse_args()
    print(f'load average before: {os.getloadavg()[0]:.2f}', file=sys.stderr)
    with tempfile.TemporaryDirectory() as folder:
        write_images(folder, args.images)
        print(f'| batch | method | command (images/s) | loop (images/s) | command / loop |')
        print('|---|---|---|---|---|')
        for batch in args.batches:
            for method in args.methods:
                looped = child('loop', method, folder, batch, args)
                if method == 'lxt_gamma':
                    print(f'| {batch} | LXT 2.1 recipe | - | {looped:.2f} | - |', flush=True)
                    continue
                commanded = child('command', method, folder, batch, args)
                print(f'| {batch} | {method} | {commanded:.2f} | {looped:.2f} | {commanded / looped:.2f} |', flush=True)
    print(f'load average after: {os.getloadavg()[0]:.2f}', file=sys.stderr)


if __name__ == '__main__':
    main()
