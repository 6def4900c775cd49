"""Attention alone, forward+backward: lxt_ext's fused AttnLRP op vs LXT's recipe vs plain SDPA.

    OMP_WAIT_POLICY=PASSIVE python python/benchmarks/benchmark_attention.py [--lengths 1024 2048 ...] [--repeats 5]
        [--methods lxt_ext sdpa ...] [--no-memory]

Methods (batch 1, D = 64, float32, torch.set_num_threads(2)): ``lxt_ext`` (AttnLRP, default rule),
``lxt_ext_own`` (AttnLRP on the own kernels), ``lxt_ext_cp`` / ``lxt_ext_cp_aten`` (CP-LRP, default rule /
ATen's kernels), ``lxt_eager`` (LXT 2.1's eager recipe with divided gradients), ``sdpa`` (plain SDPA
forward+backward, the floor); see harness/attention.py.

Peak memory: each (method, N, heads) in its own process with MALLOC_MMAP_THRESHOLD_=65536
MALLOC_TRIM_THRESHOLD_=0; VmRSS after making the inputs, the high-water mark reset through
/proc/self/clear_refs, one forward+backward, VmHWM minus that VmRSS. Time: in another process per
(N, heads) with the default allocator, a warm-up, then the median of the repeats with the methods
interleaved. The eager recipe keeps several N x N float matrices per head; EAGER_MAX_ELEMENTS caps
heads * N^2 so it is skipped (shown as -) where that would not fit this machine's memory.
"""
import argparse
import json
import os
import sys

import torch

from harness.attention import METHODS, attention, make_inputs, run_once
from harness.memory import extra_peak_mb
from harness.process import last_line
from harness.timing import interleaved_medians

EAGER_MAX_ELEMENTS = 4 * 8192 ** 2  # 1 GiB per N x N float32 matrix over all heads


def measure_memory(method, n, heads):
    torch.set_num_threads(2)
    f = attention(method)
    q, k, v, g = make_inputs(n, heads)
    return extra_peak_mb(lambda: run_once(f, q, k, v, g))


def measure_time(n, heads, repeats, methods):
    torch.set_num_threads(2)
    fs = {m: attention(m) for m in methods}
    q, k, v, g = make_inputs(n, heads)
    return interleaved_medians({m: lambda f=f: run_once(f, q, k, v, g) for m, f in fs.items()}, repeats)


def main():
    if sys.argv[1:2] == ['--memory']:
        print(measure_memory(sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
        return
    if sys.argv[1:2] == ['--time']:
        n, heads, repeats = (int(a) for a in sys.argv[2:5])
        print(json.dumps(measure_time(n, heads, repeats, sys.argv[5].split(','))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--lengths', type=int, nargs='+', default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument('--heads', type=int, default=4)
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--methods', nargs='+', default=list(METHODS), choices=METHODS)
    parser.add_argument('--no-memory', action='store_true', help='times only')
    args = parser.parse_args()
    print(f'load average before: {os.getloadavg()[0]:.1f}', file=sys.stderr)
    cases = [(n, args.heads) for n in args.lengths]
    if 'lxt_eager' in args.methods and any(n * n * args.heads > EAGER_MAX_ELEMENTS for n in args.lengths):
        # The longest length once more with one head, where the eager recipe fits.
        cases.append((max(args.lengths), 1))
    print('| N | heads | ' + ' | '.join(f'{m} s' for m in args.methods) + ' | '
          + ' | '.join(f'{m} / sdpa' for m in args.methods if m != 'sdpa')
          + ('' if args.no_memory else ' | ' + ' | '.join(f'{m} MB' for m in args.methods)) + ' | load |')
    columns = 3 + len(args.methods) + (len(args.methods) - 1) + (0 if args.no_memory else len(args.methods))
    print('|' + '---|' * columns)
    for n, heads in cases:
        methods = [m for m in args.methods if m != 'lxt_eager' or n * n * heads <= EAGER_MAX_ELEMENTS]
        mb = {} if args.no_memory else {
            m: float(last_line(__file__, ['--memory', m, n, heads], memory=True)) for m in methods}
        seconds = json.loads(last_line(__file__, ['--time', n, heads, args.repeats, ','.join(methods)]))
        load = os.getloadavg()[0]
        print(f'  N={n} heads={heads} MB={mb} s={seconds} load={load:.1f}', file=sys.stderr)
        cell = lambda d, m, fmt: format(d[m], fmt) if m in d else '-'  # noqa: E731
        ratio = lambda a: f'{seconds[a] / seconds["sdpa"]:.2f}' if a in seconds and 'sdpa' in seconds else '-'  # noqa: E731
        row = [str(n), str(heads)] + [cell(seconds, m, '.3f') for m in args.methods]
        row += [ratio(m) for m in args.methods if m != 'sdpa']
        row += [] if args.no_memory else [cell(mb, m, '.1f') for m in args.methods]
        print('| ' + ' | '.join(row + [f'{load:.1f}']) + ' |', flush=True)


if __name__ == '__main__':
    main()
