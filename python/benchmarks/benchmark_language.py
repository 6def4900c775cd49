"""Time and extra peak memory of AttnLRP relevance for a LLaMA-style decoder (2 threads).

    python python/benchmarks/benchmark_language.py [--tokens 2048] [--repeats 5] [--methods plain lxt_ext lxt]

The workload: transformers' LlamaForCausalLM with random weights, 8 layers, width 512, grouped-query
attention with 8 query and 2 key/value heads, MLP width 1536, vocabulary 32000, one sequence of
``--tokens`` tokens, explained at the top logit of the last token (``logits_to_keep=1``), w.r.t. the
input embeddings (relevance x * grad), float32. Methods: ``plain`` (forward+backward, the gradient
w.r.t. the embeddings), ``lxt_ext`` (``LanguageTransformer(attention='attnlrp')`` with
``Explainer``), ``lxt`` (LXT 2.1's efficient recipe: ``monkey_patch(modeling_llama)``, the
model's default attention, x * grad), ``plain_oracle`` and ``lxt_ext_oracle`` (plain forward+backward and
lxt_ext there, to tell the transformers versions apart), which run in LXT's oracle environment (``.oracle`` first on
PYTHONPATH, transformers 4.57; ``LXT_ORACLE_PATH`` overrides). Both build the same weights
(``torch.manual_seed(0)``) and the same embeddings.

Every method runs in a process of its own (``OMP_WAIT_POLICY=PASSIVE`` recommended on shared cores).
Time: the processes take turns, one attribution each per round (``interleaved_processes``), so that
load from other programs hits all alike; a warm-up round, then the median of ``--repeats`` rounds.
Memory (``MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0``): VmRSS after building model and
input, reset the high-water mark, one attribution, VmHWM minus that VmRSS. ``--relevance`` also compares lxt_ext's relevance with LXT's
(max |difference| / max |LXT relevance|).
"""
import argparse
import os
import sys
import tempfile

import torch

from harness.memory import extra_peak_mb
from harness.process import interleaved_processes, last_line, serve

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # python/benchmarks/ is two below
METHODS = ('plain', 'lxt_ext', 'lxt', 'plain_oracle', 'lxt_ext_oracle')
LABELS = {'plain': 'plain forward+backward', 'lxt_ext': 'lxt_ext LanguageTransformer (AttnLRP)',
          'lxt': 'LXT 2.1 efficient recipe (AttnLRP)',
          'plain_oracle': "plain forward+backward in LXT's environment (transformers 4.57)",
          'lxt_ext_oracle': "lxt_ext LanguageTransformer in LXT's environment (transformers 4.57)"}
ORACLE_METHODS = ('lxt', 'plain_oracle', 'lxt_ext_oracle')
CONFIG = dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
              num_key_value_heads=2, max_position_embeddings=16384)


def workload(tokens, lxt=False, weights=None, attention=None):
    """``(model, embeds)``: the seeded random-weight decoder and one sequence's input embeddings (from the
    file ``weights`` when given: transformers 4.x and 5.x need not draw the same weights from one seed);
    ``attention`` names transformers' attention implementation (default: the library's, SDPA)."""
    import transformers
    if lxt:
        from lxt.efficient import monkey_patch
        from transformers.models.llama import modeling_llama
        monkey_patch(modeling_llama, verbose=False)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**CONFIG)
    if attention:
        config._attn_implementation = attention
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, CONFIG['vocab_size'], (1, tokens))
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
    if weights:
        saved = torch.load(weights)
        model.load_state_dict(saved['state'])
        embeds = saved['embeds']
    return model, embeds


def attribution(method, tokens, weights=None, attention=None):
    """A function running one attribution of ``method``, returning the relevance (1, tokens, 512)."""
    torch.set_num_threads(2)
    model, embeds = workload(tokens, lxt=method == 'lxt', weights=weights, attention=attention)

    def logits(x):
        return model(inputs_embeds=x, logits_to_keep=1).logits[:, -1]

    if method in ('lxt_ext', 'lxt_ext_oracle'):
        from lxt_ext.attribution import Explainer
        from lxt_ext.composites import LanguageTransformer
        composite = LanguageTransformer(attention='attnlrp')

        def run():
            with Explainer(model, composite, forward=lambda m, x: logits(x)) as attributor:
                # the top logit of every position, as relevance (LXT backpropagates its one-hot)
                return attributor(embeds, lambda out: torch.zeros_like(out).scatter_(
                    -1, out.argmax(-1, keepdim=True), 1.0) * out)[1]
        return run

    def run():  # the gradient w.r.t. the embeddings only (no parameter gradients), as the Explainer
        x = embeds.clone().requires_grad_()
        out = logits(x)
        grad, = torch.autograd.grad(out.gather(-1, out.argmax(-1, keepdim=True)).sum(), x)
        return (x * grad).detach()
    return run


def measure(method, kind, tokens, weights=''):
    """GB of extra peak memory (``kind='memory'``), or 0 after saving the relevance to ``weights.method``."""
    run = attribution(method, tokens, weights)
    if kind == 'memory':
        return extra_peak_mb(run) / 1024
    torch.save(run(), f'{weights}.{method}')
    return 0.0


def child(method, kind, tokens, weights=''):
    """``measure`` in a fresh process; LXT's methods with its environment."""
    args = ['--one', method, kind, tokens, weights]
    return float(last_line(__file__, args, memory=kind == 'memory', env=oracle_env(method)))


def oracle_env(method):
    """LXT's oracle environment first on PYTHONPATH for the methods that run there."""
    if method not in ORACLE_METHODS:
        return {}
    oracle = os.environ.get('LXT_ORACLE_PATH') or os.path.join(ROOT, '.oracle')
    return {'PYTHONPATH': os.pathsep.join(filter(None, [oracle, os.environ.get('PYTHONPATH')]))}


def main():
    if len(sys.argv) == 6 and sys.argv[1] == '--one':
        print(measure(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]))
        return
    if len(sys.argv) == 4 and sys.argv[1] == '--serve':
        serve(attribution(sys.argv[2], int(sys.argv[3])))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--tokens', type=int, default=2048)
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--methods', nargs='+', default=list(METHODS), choices=METHODS)
    parser.add_argument('--relevance', action='store_true', help="compare lxt_ext's relevance with LXT's")
    args = parser.parse_args()
    print(f'load average before: {os.getloadavg()[0]:.1f}', file=sys.stderr)
    # Time: every method in a process of its own, the processes taking turns (interleaved medians).
    seconds = interleaved_processes({m: (__file__, ['--serve', m, args.tokens], oracle_env(m)) for m in args.methods},
                                    args.repeats)
    print(f'  times {seconds} (load {os.getloadavg()[0]:.1f})', file=sys.stderr)
    results = {}
    for method in args.methods:
        gigabytes = child(method, 'memory', args.tokens)
        results[method] = seconds[method], gigabytes
        print(f'  {method}: {gigabytes:.3f} GB (load {os.getloadavg()[0]:.1f})', file=sys.stderr)
    print(f'| method | time (s) | extra peak memory (GB) | time / plain | memory / plain | time / LXT | memory / LXT |')
    print('|---|---|---|---|---|---|---|')
    for method, (seconds, gigabytes) in results.items():
        cells = [f'{seconds / results[ref][0]:.2f} | {gigabytes / results[ref][1]:.2f}' if ref in results else '- | -'
                 for ref in ('plain', 'lxt')]
        print(f'| {LABELS[method]} | {seconds:.2f} | {gigabytes:.3f} | {" | ".join(cells)} |')
    if args.relevance:
        with tempfile.TemporaryDirectory() as tmp:
            weights = os.path.join(tmp, 'weights.pt')
            model, embeds = workload(args.tokens)
            torch.save({'state': model.state_dict(), 'embeds': embeds}, weights)
            for method in ('lxt_ext', 'lxt'):
                child(method, 'relevance', args.tokens, weights)
            ours, theirs = (torch.load(f'{weights}.{m}') for m in ('lxt_ext', 'lxt'))
        error = ((ours - theirs).abs().max() / theirs.abs().max()).item()
        print(f'relevance: max |lxt_ext - LXT| = {error:.1e} x max |LXT relevance|')


if __name__ == '__main__':
    main()
