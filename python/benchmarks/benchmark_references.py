"""Streaming the reference search: ``lxt-ext references`` on generated images of the embedded model, images/s and
peak memory for growing data sets (the goal: peak memory at 5,000 images within 10 % of that at 1,000).

    python python/benchmarks/benchmark_references.py [--images 1000 5000] [--threads 1] [--batch-size 32]
                                                     [--layer neurons:3] [--units all] [--k 8]

Each count runs twice, each time in a fresh process calling the command (``lxt_ext.cli.main``):
- time: the default allocator; the command's own images/s (the search: explaining every image and keeping each
  unit's top k, the batches' parts written) and the wall time of the whole command (with the merge and the
  drawing of the sheets and pages, which do not depend on the number of images);
- memory: under ``harness.memory.MEMORY_ENV`` (large blocks mmapped, freed memory returned at once); after the
  imports the process notes VmRSS, resets the high-water mark, runs the command and reads VmHWM: the peak RSS of
  the whole command and its extra over the imported baseline (the model, the search, the merge and the drawing).
Prints a markdown table and the ratios of the peaks at the largest count to those at the smallest.
"""
import argparse
import json
import os
import re
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from harness.process import last_line  # noqa: E402


def child(kind, images, threads, batch_size, layer, units, k, out):
    """One measurement in this (fresh) process; prints one JSON line."""
    import io

    import torch

    from harness.memory import reset_peak, status_kb
    from lxt_ext.cli import main

    torch.set_num_threads(threads)
    import lxt_ext.concepts  # noqa: F401  (imported before the baseline, as the command would)
    argv = ['references', '--generate', str(images), '--threads', str(threads), '--batch-size', str(batch_size),
            '--layer', layer, '--k', str(k), '--quiet', '--out', out]
    if units != 'all':
        argv += ['--units', units]
    before = status_kb('VmRSS')
    reset_peak()
    captured, stdout = io.StringIO(), sys.stdout
    sys.stdout = captured
    try:
        status = main(argv)
    finally:
        sys.stdout = stdout
    if status != 0:
        raise SystemExit(f'lxt-ext references exited {status}')
    peak = status_kb('VmHWM')
    found = re.search(r'searched (\d+) images in ([\d.]+) s \(([\d.]+) images/s', captured.getvalue())
    print(json.dumps({'kind': kind, 'images': int(found.group(1)), 'search_s': float(found.group(2)),
                      'images_per_s': float(found.group(3)), 'baseline_mb': before / 1024, 'peak_mb': peak / 1024,
                      'extra_mb': (peak - before) / 1024}))


def measure(kind, images, args):
    with tempfile.TemporaryDirectory() as folder:
        line = last_line(__file__, ['--child', kind, images, args.threads, args.batch_size, args.layer, args.units,
                                    args.k, os.path.join(folder, 'out')], memory=kind == 'memory')
    return json.loads(line)


def main():
    if sys.argv[1:2] == ['--child']:
        kind, images, threads, batch_size, layer, units, k, out = sys.argv[2:]
        child(kind, int(images), int(threads), int(batch_size), layer, units, int(k), out)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--images', type=int, nargs='+', default=[1000, 5000])
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--layer', default='neurons:3')
    parser.add_argument('--units', default='all', help='units of the layer (e.g. 0-15), or all')
    parser.add_argument('--k', type=int, default=8)
    args = parser.parse_args()
    print(f'load average before: {os.getloadavg()[0]:.2f}', file=sys.stderr)
    rows = []
    for images in args.images:
        timed, memory = measure('time', images, args), measure('memory', images, args)
        rows.append((images, timed, memory))
        print(f'{images} images: {timed["images_per_s"]:.1f} images/s, peak {memory["peak_mb"]:.1f} MB',
              file=sys.stderr, flush=True)
    units = 'all units' if args.units == 'all' else f'units {args.units}'
    print(f'lxt-ext references --generate N --layer {args.layer} ({units}, k = {args.k}), batch {args.batch_size}, '
          f'{args.threads} thread{"s" * (args.threads != 1)}, the embedded model, ViTGamma:\n')
    print('| images | search (images/s) | search (s) | peak RSS (MB) | extra peak over the imports (MB) |')
    print('|---|---|---|---|---|')
    for images, timed, memory in rows:
        print(f'| {images} | {timed["images_per_s"]:.1f} | {timed["search_s"]:.1f} | {memory["peak_mb"]:.1f} | '
              f'{memory["extra_mb"]:.1f} |')
    if len(rows) > 1:
        (small, _, low), (large, _, high) = rows[0], rows[-1]
        print(f'\n| ratio | peak RSS | extra peak |\n|---|---|---|\n| {large} / {small} images | '
              f'{high["peak_mb"] / low["peak_mb"]:.3f} | {high["extra_mb"] / low["extra_mb"]:.3f} |')
    print(f'load average after: {os.getloadavg()[0]:.2f}', file=sys.stderr)


if __name__ == '__main__':
    main()
