"""Sweep transformers' causal-LM zoo: every model type built from a tiny config with random weights and its
additive offsets zeroed, explained with ``LanguageTransformer(attention='cp')`` w.r.t. its input embeddings, and
given one verdict:

- ``exact``: the registered forward gives the plain output and the input relevance sums to the explained logit
  (the top logit at the last token) within ``--rtol`` (CP-LRP conserves once biases and position tables are zero);
- ``refused``: lxt_ext refused it by name (at registration, or in the forward before any relevance), as it should
  when it has no rule;
- ``leaks``: relevance came back and does not sum to the logit: a wrong heatmap without a word (the worst case);
- ``changes output``: the forward under the composite differs from the plain one;
- ``crash``: an error that is not lxt_ext's (or a timeout, or the memory limit);
- ``not built``: the tiny config could not give a model that takes ``inputs_embeds`` (not lxt_ext's concern).

Each type runs in a forked child with an address-space limit and a time limit, so that a config that allocates
gigabytes or hangs ends only itself. Writes a JSON file and a markdown table (``--out``):

    python python/benchmarks/zoo_sweep.py --out docs/zoo            # all causal-LM types
    python python/benchmarks/zoo_sweep.py llama mamba --out /tmp/zoo  # some
"""
import argparse
import json
import multiprocessing
import os
import resource
import signal
import sys
import time
import traceback

# one generic shrink: transformers' configs map these standard names onto their own (attribute_map), and a name a
# config does not know is only stored on it
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, vocab_size=64, max_position_embeddings=64, num_experts=4, num_local_experts=4,
            num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32, n_routed_experts=4,
            n_shared_experts=1, first_k_dense_replace=1, state_size=8, ssm_state_size=8, expand=2, conv_kernel=4,
            time_step_rank=8, mamba_d_state=8, mamba_n_heads=4, mamba_d_head=16, kv_lora_rank=16, q_lora_rank=16,
            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, sliding_window=16, attention_chunk_size=16,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
VERDICTS = ('exact', 'refused', 'leaks', 'changes output', 'crash', 'not built')
LXT_EXT_ERRORS = ('UnmappedModuleError', 'UncoveredOperationError', 'UnsupportedLayerError', 'NonFiniteError')


def lxt_ext_refusal(error, text):
    """Whether ``error`` is lxt_ext's refusal: its own error types, or an error raised from lxt_ext's code that says
    what lxt_ext does not cover."""
    if type(error).__name__ in LXT_EXT_ERRORS:
        return True
    frames = traceback.extract_tb(error.__traceback__)
    raised_by_lxt_ext = bool(frames) and f'{os.sep}lxt_ext{os.sep}' in frames[-1].filename
    return raised_by_lxt_ext and isinstance(error, (NotImplementedError, TypeError, ValueError)) and 'lxt_ext' in text


def build(model_type, seed=0):
    import torch
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = transformers.AutoConfig.for_model(model_type, **TINY)
    torch.manual_seed(seed)
    cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
    return cls(config).eval()


def explain(model_type, rtol):
    """The verdict of one model type (run in the child)."""
    import torch
    from lxt_ext.attribution import Explainer
    from lxt_ext.composites import LanguageTransformer
    from lxt_ext.diagnostics.conservation import zeroed

    torch.set_num_threads(1)
    try:
        model = build(model_type)
        ids = torch.randint(3, 64, (1, 6), generator=torch.Generator().manual_seed(1))
        embeds = model.get_input_embeddings()(ids).detach()

        def forward(m, x):
            return m(inputs_embeds=x, use_cache=False).logits

        with torch.no_grad():
            forward(model, embeds)
    except Exception as error:  # noqa: BLE001
        return {'verdict': 'not built', 'detail': f'{type(error).__name__}: {str(error)[:200]}'}
    with zeroed(model) as names, torch.no_grad():
        plain = forward(model, embeds).float()
    try:
        with zeroed(model):
            with Explainer(model, LanguageTransformer(attention='cp'), forward=forward) as explainer:
                e = explainer(embeds)
    except Exception as error:  # noqa: BLE001
        text = f'{type(error).__name__}: {error}'
        verdict = 'refused' if lxt_ext_refusal(error, text) else 'crash'
        return {'verdict': verdict, 'detail': text[:300]}
    output = e.output.float()
    scale = float(plain.abs().max()) or 1.
    if not torch.allclose(output, plain, rtol=1e-4, atol=1e-5 * scale):
        return {'verdict': 'changes output', 'detail': f'max |difference| {float((output - plain).abs().max()):.3g}'}
    total, logit = float(e.relevance.double().sum()), float(e.score.double().sum())
    error = abs(total - logit) / max(abs(logit), 1e-12)
    verdict = 'exact' if error <= rtol else 'leaks'
    return {'verdict': verdict, 'detail': f'relative error {error:.2g} (zeroed {len(names)} offsets)', 'error': error}


def _child(model_type, rtol, memory_gb, send):
    resource.setrlimit(resource.RLIMIT_AS, (memory_gb << 30, memory_gb << 30))
    try:
        send.send(explain(model_type, rtol))
    except MemoryError:
        send.send({'verdict': 'crash', 'detail': f'over the {memory_gb} GB limit'})
    except BaseException as error:  # noqa: BLE001
        send.send({'verdict': 'crash', 'detail': f'{type(error).__name__}: {str(error)[:300]}'})


def run_one(model_type, rtol, memory_gb, seconds):
    context = multiprocessing.get_context('fork')
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_child, args=(model_type, rtol, memory_gb, send))
    start = time.perf_counter()
    child.start()
    result = receive.recv() if receive.poll(seconds) else {'verdict': 'crash', 'detail': f'no verdict in {seconds} s'}
    if child.is_alive():
        os.kill(child.pid, signal.SIGKILL)
    child.join()
    if result is None:
        result = {'verdict': 'crash', 'detail': f'the child ended with {child.exitcode}'}
    result['seconds'] = round(time.perf_counter() - start, 1)
    return result


def table(results, command):
    verdicts = [result['verdict'] for name, result in results.items() if not name.startswith('_')]
    counts = {verdict: verdicts.count(verdict) for verdict in VERDICTS}
    built = sum(counts.values()) - counts['not built']
    lines = ['# The causal-LM zoo under lxt_ext (generated)', '',
             f'Generated by `{command}`; transformers {results.get("_transformers", "")}. Each model type of '
             'transformers\' causal-LM mapping built from one tiny config (random weights, offsets zeroed), '
             "explained with `LanguageTransformer(attention='cp')` w.r.t. its input embeddings.", '',
             '| verdict | types |', '|---|---|']
    lines += [f'| {verdict} | {counts[verdict]} |' for verdict in VERDICTS]
    lines += ['', f'{built} built; exact: {counts["exact"]} of {built}.', '', '| type | verdict | detail |', '|---|---|---|']
    for name, result in sorted(results.items()):
        if not name.startswith('_'):
            detail = result['detail'].replace('|', '\\|').replace('\n', ' ')
            lines.append(f'| {name} | {result["verdict"]} | {detail} |')
    return '\n'.join(lines) + '\n'


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('types', nargs='*', help='model types (default: every causal-LM type)')
    parser.add_argument('--out', required=True, help='folder for causal_lm.json and causal_lm.md')
    parser.add_argument('--rtol', type=float, default=1e-3)
    parser.add_argument('--memory-gb', type=int, default=6)
    parser.add_argument('--seconds', type=int, default=120)
    parser.add_argument('--table-from', metavar='JSON', help='only write the table of an earlier sweep\'s JSON')
    args = parser.parse_args(argv)
    command = 'python python/benchmarks/zoo_sweep.py ' + ' '.join(sys.argv[1:] if argv is None else argv)
    if args.table_from:
        with open(args.table_from) as file:
            results = json.load(file)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, 'causal_lm.md'), 'w') as file:
            file.write(table(results, results.get('_command', command)))
        return 0
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    types = args.types or sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    results = {'_transformers': transformers.__version__, '_command': command}
    for i, model_type in enumerate(types, 1):
        results[model_type] = run_one(model_type, args.rtol, args.memory_gb, args.seconds)
        print(f'[{i}/{len(types)}] {model_type}: {results[model_type]["verdict"]} ({results[model_type]["detail"][:100]})',
              flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, 'causal_lm.json'), 'w') as file:
        json.dump(results, file, indent=1)
    with open(os.path.join(args.out, 'causal_lm.md'), 'w') as file:
        file.write(table(results, command))
    return 0


if __name__ == '__main__':
    sys.exit(main())
