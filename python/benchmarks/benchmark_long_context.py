"""Long contexts: which sequence lengths each method explains on this machine, with time and peak memory.

    python python/benchmarks/benchmark_long_context.py [--lengths 2048 4096 8192 16384 32768 65536]
        [--methods plain lxt_ext lxt_sdpa lxt_eager] [--cap 900] [--memory-cap 20]

The workload is the language section's decoder (benchmark_language.py: LlamaForCausalLM, random weights, 8
layers, width 512, GQA 8/2, vocabulary 32000, float32, 2 threads), one sequence of each length, the top logit
of the last token explained w.r.t. the input embeddings (``logits_to_keep=1``). Methods:

- ``plain``: forward and backward, the gradient w.r.t. the embeddings (no parameter gradients);
- ``lxt_ext``: ``LanguageTransformer(attention='attnlrp')`` with ``Explainer``;
- ``lxt_sdpa`` and ``lxt_eager``: LXT 2.1's efficient recipe (``monkey_patch(modeling_llama)``) with
  transformers 4.57's SDPA attention and with its eager attention (the N x N attention matrix in memory), in
  LXT's oracle environment (``.oracle``; ``LXT_ORACLE_PATH`` overrides).

Each (method, length) runs once in a fresh process under a time cap (``--cap`` seconds, default 15 minutes) and
an address-space limit (``--memory-cap`` GiB, ``RLIMIT_AS``; allocations beyond it fail in the process instead
of waking the kernel's OOM killer). Time: one attribution's wall time (model and input built before). Memory:
VmHWM minus VmRSS before the attribution (``MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0``). A method
that fails at one length is not run at longer ones (marked "not run").
"""
import argparse
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
METHODS = ('plain', 'lxt_ext', 'lxt_sdpa', 'lxt_eager')
LABELS = {'plain': 'plain forward+backward', 'lxt_ext': 'lxt_ext (AttnLRP)',
          'lxt_sdpa': 'LXT 2.1, SDPA attention', 'lxt_eager': 'LXT 2.1, eager attention'}


def one(method, tokens):
    """Seconds and extra peak GB of one attribution (in this process)."""
    from benchmark_language import attribution
    from harness.memory import extra_peak_mb
    base = 'lxt' if method.startswith('lxt_') and method != 'lxt_ext' else method
    attention = {'lxt_sdpa': 'sdpa', 'lxt_eager': 'eager'}.get(method)
    attribution(base, 128, attention=attention)()  # one-time warm-up (kernels, allocator), not measured
    run = attribution(base, tokens, attention=attention)
    start = time.perf_counter()
    megabytes = extra_peak_mb(run)
    return time.perf_counter() - start, megabytes / 1024


def child(method, tokens, cap, memory_cap):
    """``(seconds, GB)`` or the reason it did not finish, from a fresh process."""
    from benchmark_language import oracle_env
    from harness.memory import MEMORY_ENV
    env = dict(os.environ, **MEMORY_ENV, **oracle_env('lxt' if method in ('lxt_sdpa', 'lxt_eager') else method))
    limit = int(memory_cap * 2 ** 30)

    def limits():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    try:
        process = subprocess.run([sys.executable, __file__, '--one', method, str(tokens)], env=env, timeout=cap,
                                 capture_output=True, text=True, preexec_fn=limits)
    except subprocess.TimeoutExpired:
        return f'over {cap / 60:.0f} min'
    if process.returncode != 0:
        error = process.stderr.strip().splitlines()[-1] if process.stderr.strip() else f'exit {process.returncode}'
        if 'alloc' in error.lower() or 'memory' in error.lower() or process.returncode in (-9, 137):
            return f'out of memory (over {memory_cap:g} GiB)'
        return f'failed: {error[:120]}'
    seconds, gigabytes = map(float, process.stdout.strip().splitlines()[-1].split())
    return seconds, gigabytes


def label(tokens):
    return f'{tokens // 1024}k' if tokens % 1024 == 0 else str(tokens)


def main():
    if len(sys.argv) == 4 and sys.argv[1] == '--one':
        seconds, gigabytes = one(sys.argv[2], int(sys.argv[3]))
        print(seconds, gigabytes)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--lengths', type=int, nargs='+', default=[2048, 4096, 8192, 16384, 32768, 65536])
    parser.add_argument('--methods', nargs='+', default=list(METHODS), choices=METHODS)
    parser.add_argument('--cap', type=float, default=900., help='seconds per run (default 900)')
    parser.add_argument('--memory-cap', type=float, default=20., help='GiB of address space per run (default 20)')
    args = parser.parse_args()
    results = {method: {} for method in args.methods}
    for method in args.methods:
        failed = False
        for tokens in sorted(args.lengths):
            if failed:
                results[method][tokens] = 'not run'
                continue
            outcome = child(method, tokens, args.cap, args.memory_cap)
            results[method][tokens] = outcome
            failed = isinstance(outcome, str)
            print(f'  {method} {tokens}: {outcome} (load {os.getloadavg()[0]:.1f})', file=sys.stderr, flush=True)
    lengths = sorted(args.lengths)
    print(f'Time cap {args.cap / 60:g} min and {args.memory_cap:g} GiB of address space per run; '
          f'cells: seconds / extra peak GB')
    print()
    print('| method | ' + ' | '.join(f'{label(n)} tokens' for n in lengths) + ' | longest |')
    print('|---|' + '---|' * (len(lengths) + 1))
    longest = {}
    for method, row in results.items():
        done = [n for n in lengths if not isinstance(row[n], str)]
        longest[method] = max(done) if done else 0
        cells = [row[n] if isinstance(row[n], str) else f'{row[n][0]:.1f} s / {row[n][1]:.2f} GB' for n in lengths]
        print(f'| {LABELS[method]} | ' + ' | '.join(cells) + f' | {label(longest[method]) if longest[method] else "none"} |')
    if 'lxt_ext' in longest and 'lxt_eager' in longest and longest['lxt_eager']:
        print()
        print(f'lxt_ext reaches {longest["lxt_ext"] / longest["lxt_eager"]:.0f}x the longest length of LXT\'s eager '
              f'path' + (f'; plain backward reaches {label(longest["plain"])}' if 'plain' in longest else ''))


if __name__ == '__main__':
    main()
