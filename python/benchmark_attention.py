"""Attention alone, forward+backward: lxt_ext's fused AttnLRP op vs LXT's recipe vs plain SDPA.

    python python/benchmark_attention.py [--lengths 1024 2048 ...] [--repeats 3]

Methods (batch 1, D = 64, float32, torch.set_num_threads(2)):
- ``lxt_ext``: ``lxt_ext.attention.attention_lrp(q, k, v, mode='attnlrp')``;
- ``lxt_eager``: what LXT 2.1 runs (HF's eager_attention_forward after ``divide_gradient`` on q, k,
  v): matmul, softmax, matmul, with the gradients of q and k divided by 4 and of v by 2 -- the
  same AttnLRP relevance, through the N x N matrices;
- ``sdpa``: plain ``torch.nn.functional.scaled_dot_product_attention`` forward+backward (the
  exact gradient, no LRP), the floor.

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
import statistics
import subprocess
import sys
import time

from peak_memory import MEMORY_ENV, extra_peak_mb

METHODS = ('lxt_ext', 'lxt_eager', 'sdpa')
EAGER_MAX_ELEMENTS = 4 * 8192 ** 2  # 1 GiB per N x N float32 matrix over all heads
D = 64


def attention(method):
    """``f(q, k, v) -> output`` of a method; backward of the output gives its relevance gradient."""
    import torch
    import torch.nn.functional as F

    if method == 'lxt_ext':
        from lxt_ext.attention import attention_lrp
        return lambda q, k, v: attention_lrp(q, k, v, mode='attnlrp')
    if method == 'sdpa':
        return F.scaled_dot_product_attention

    class DivideGradient(torch.autograd.Function):
        """LXT's divide_gradient: identity forward, gradient / factor backward."""

        @staticmethod
        def forward(ctx, x, factor):
            ctx.factor = factor
            return x.view_as(x)

        @staticmethod
        def backward(ctx, grad):
            return grad / ctx.factor, None

    def eager(q, k, v):
        q, k, v = DivideGradient.apply(q, 4.0), DivideGradient.apply(k, 4.0), DivideGradient.apply(v, 2.0)
        weights = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5
        weights = torch.softmax(weights, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(weights, v)

    return eager


def make_inputs(n, heads):
    import torch
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, D, requires_grad=True) for _ in range(3))
    return q, k, v, torch.randn(1, heads, n, D)


def run_once(f, q, k, v, g):
    q.grad = k.grad = v.grad = None
    f(q, k, v).backward(g)


def measure_memory(method, n, heads):
    import torch
    torch.set_num_threads(2)
    f = attention(method)
    q, k, v, g = make_inputs(n, heads)
    return extra_peak_mb(lambda: run_once(f, q, k, v, g))


def measure_time(n, heads, repeats, methods):
    import torch
    torch.set_num_threads(2)
    fs = {m: attention(m) for m in methods}
    q, k, v, g = make_inputs(n, heads)
    times = {m: [] for m in methods}
    for f in fs.values():
        run_once(f, q, k, v, g)
    for _ in range(repeats):
        for m, f in fs.items():
            start = time.perf_counter()
            run_once(f, q, k, v, g)
            times[m].append(time.perf_counter() - start)
    return {m: statistics.median(t) for m, t in times.items()}


def child(args):
    """The last line a measurement printed in a fresh process (memory runs with the mmap allocator)."""
    env = dict(os.environ)
    if args[0] == '--memory':
        env.update(MEMORY_ENV)
    return subprocess.run([sys.executable, __file__] + [str(a) for a in args], check=True, capture_output=True,
                          text=True, env=env).stdout.strip().splitlines()[-1]


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
    parser.add_argument('--repeats', type=int, default=3)
    args = parser.parse_args()
    cases = [(n, args.heads) for n in args.lengths]
    if any(n * n * args.heads > EAGER_MAX_ELEMENTS for n in args.lengths):
        # The longest length once more with one head, where the eager recipe fits.
        cases.append((max(args.lengths), 1))
    print('| N | heads | extra peak MB: lxt_ext | LXT eager | SDPA | fwd+bwd s: lxt_ext | LXT eager | SDPA '
          '| lxt_ext / eager time | lxt_ext / SDPA time |')
    print('|---|---|---|---|---|---|---|---|---|---|')
    for n, heads in cases:
        methods = [m for m in METHODS if m != 'lxt_eager' or n * n * heads <= EAGER_MAX_ELEMENTS]
        mb = {m: float(child(['--memory', m, n, heads])) for m in methods}
        seconds = json.loads(child(['--time', n, heads, args.repeats, ','.join(methods)]))
        print(f'  N={n} heads={heads} MB={mb} s={seconds}', file=sys.stderr)
        cell = lambda d, m, fmt: format(d[m], fmt) if m in d else '-'  # noqa: E731
        ratio = lambda a, b: f'{seconds[a] / seconds[b]:.2f}' if a in seconds and b in seconds else '-'  # noqa: E731
        print(f"| {n} | {heads} | {cell(mb, 'lxt_ext', '.1f')} | {cell(mb, 'lxt_eager', '.1f')} | "
              f"{cell(mb, 'sdpa', '.1f')} | {cell(seconds, 'lxt_ext', '.3f')} | {cell(seconds, 'lxt_eager', '.3f')} | "
              f"{cell(seconds, 'sdpa', '.3f')} | {ratio('lxt_ext', 'lxt_eager')} | {ratio('lxt_ext', 'sdpa')} |",
              flush=True)


if __name__ == '__main__':
    main()
