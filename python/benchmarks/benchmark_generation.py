"""Generated text explained from one forward against the step-by-step loop (2 threads).

    python python/benchmarks/benchmark_generation.py [--prompt 512] [--generated 64] [--repeats 3]

The workload: the language section's decoder (benchmark_language.py: LlamaForCausalLM with random weights, 8
layers, width 512, GQA 8/2, vocabulary 32000), one sequence of ``--prompt`` prompt tokens and ``--generated``
generated tokens (random ids, seed 0), AttnLRP (``LanguageTransformer(attention='attnlrp')``), each generated
token's logit as its seed, relevance w.r.t. the input embeddings summed per token. Methods:

- ``loop``: the step-by-step loop as inseq runs it, a forward and a backward per generated token on the growing
  prefix (lxt_ext's ``Explainer``, the composite registered once; ``logits_to_keep=1``, so the loop pays for no
  vocabulary-wide logits it does not explain: the strongest form of the baseline). It gives the matrix (every
  generated token against every earlier token); its rows summed, the whole answer's relevance.
- ``answer``: ``explain_generation(..., matrix=False)``: one forward over prompt + answer, one backward.
- ``matrix``: ``explain_generation(..., matrix=True)``: one forward, one backward per generated token over the
  retained graph.

Time: every method in a process of its own, the processes taking turns (``interleaved_processes``), a warm-up
round, then the median of ``--repeats`` rounds. Memory (``MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0``):
VmRSS after building model and input, the high-water mark reset, one run, VmHWM minus that VmRSS.
"""
import argparse
import os
import sys

import torch

from harness.memory import extra_peak_mb
from harness.process import interleaved_processes, last_line, serve

METHODS = ('loop', 'answer', 'matrix')
LABELS = {'loop': 'step-by-step loop (a forward and a backward per generated token)',
          'answer': 'explain_generation, the whole answer (one forward, one backward)',
          'matrix': 'explain_generation, the token-to-token matrix (one forward, a backward per generated token)'}


def attribution(method, prompt, generated):
    """A function running one attribution of ``method``."""
    from benchmark_language import workload
    from lxt_ext.attribution import Explainer
    from lxt_ext.attribution.generation import explain_generation
    from lxt_ext.composites import LanguageTransformer
    torch.set_num_threads(2)
    tokens = prompt + generated
    model, _ = workload(tokens)
    ids = torch.randint(0, model.config.vocab_size, (tokens,), generator=torch.Generator().manual_seed(0))
    composite = LanguageTransformer(attention='attnlrp')
    if method == 'loop':
        with torch.no_grad():
            embeds = model.get_input_embeddings()(ids[None])

        def run():
            rows = torch.zeros(generated, tokens)
            with Explainer(model, composite,
                           forward=lambda m, x: m(inputs_embeds=x, logits_to_keep=1).logits[:, -1]) as explainer:
                for i in range(generated):
                    position = prompt + i
                    rows[i, :position] = explainer(embeds[:, :position], int(ids[position])).relevance.sum(-1)[0]
            return rows
        return run
    return lambda: explain_generation(model, ids, prompt, composite, matrix=method == 'matrix')


def main():
    if len(sys.argv) == 6 and sys.argv[1] == '--one':
        run = attribution(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        print(extra_peak_mb(run) / 1024)
        return
    if len(sys.argv) == 5 and sys.argv[1] == '--serve':
        serve(attribution(sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--prompt', type=int, default=512)
    parser.add_argument('--generated', type=int, default=64)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--methods', nargs='+', default=list(METHODS), choices=METHODS)
    args = parser.parse_args()
    print(f'load average before: {os.getloadavg()[0]:.1f}', file=sys.stderr)
    seconds = interleaved_processes(
        {m: (__file__, ['--serve', m, args.prompt, args.generated], {}) for m in args.methods}, args.repeats)
    print(f'  times {seconds} (load {os.getloadavg()[0]:.1f})', file=sys.stderr)
    results = {}
    for method in args.methods:
        gigabytes = float(last_line(__file__, ['--one', method, args.prompt, args.generated, 'memory'], memory=True))
        results[method] = seconds[method], gigabytes
        print(f'  {method}: {gigabytes:.3f} GB (load {os.getloadavg()[0]:.1f})', file=sys.stderr)
    print(f'{args.prompt} prompt tokens, {args.generated} generated, AttnLRP')
    print()
    print('| method | time (s) | extra peak memory (GB) | time / loop | memory / loop |')
    print('|---|---|---|---|---|')
    for method, (time, gigabytes) in results.items():
        ratio = (f'{time / results["loop"][0]:.3f} | {gigabytes / results["loop"][1]:.2f}' if 'loop' in results
                 else '- | -')
        print(f'| {LABELS[method]} | {time:.2f} | {gigabytes:.3f} | {ratio} |')


if __name__ == '__main__':
    main()
