"""One benchmark report: runs the benchmark scripts and the pytest-benchmark suites and writes
docs/benchmarks.md (generated: tables, PNG plots, machine, versions, threads, load, date).

    python python/benchmarks/benchmark_report.py            # the full suite (about 45 minutes on 2 CPU cores)
    python python/benchmarks/benchmark_report.py --quick --out /tmp/report.md   # small sizes, a smoke test
    python python/benchmarks/benchmark_report.py --only cnn vit                  # some sections (an existing report
                                                                      # keeps the others, its header notes the re-run)

Sections (each a script of python/benchmarks/ run in its own processes, with its own method: interleaved medians for
time, fresh processes with mmapped allocations for peak memory, see each script's doc):
- ``cnn``: EpsilonGammaBox on vgg16 and resnet50, lxt_ext vs zennit vs plain forward+backward
  (benchmark_time.py, benchmark_memory.py);
- ``vit``: vit_b_16, ViTEpsilon and ViTGamma vs LXT 2.1's recipe and plain (benchmark_vit.py);
- ``language``: a LLaMA-style decoder at 2,048 tokens, AttnLRP vs LXT 2.1 and plain (benchmark_language.py);
- ``generation``: a generated answer explained from one forward vs the step-by-step loop (benchmark_generation.py);
- ``long_context``: which lengths (2k-64k tokens) lxt_ext, LXT 2.1 (SDPA and eager) and plain backward explain
  under a time and memory cap (benchmark_long_context.py; hours: only with ``--only long_context``);
- ``attention``: the attention op alone, 1k-16k tokens, vs LXT's eager recipe and SDPA (benchmark_attention.py);
- ``explain``: ``lxt-ext explain`` images/s vs an in-process loop and LXT's recipe (benchmark_explain.py);
- ``checks``: the per-layer NaN/Inf checks on and off (benchmark_checks.py, ViTEpsilon and the decoder);
- ``operations``: the operation rules on and off (benchmark_operations.py, the decoder and vit_b_16);
- ``quantus``: perturbation curves vs Quantus 0.6, values and time against the forwards (benchmark_quantus.py);
- ``zoo``: the zoo sweep's verdicts per zoo (zoo_sweep.py, about 7 minutes with 2 jobs);
- ``evaluation``: ``lxt-ext evaluate`` on the embedded model, seconds per image per method;
- ``faithfulness``: the methods' faithfulness at scale with intervals and paired tests (2,000 generated images,
  AttnLRP and DynamicLRP protocols, the gamma grid; real text with MiniLM; about an hour: only with ``--only
  faithfulness``);
- ``references``: ``lxt-ext references`` streaming 1,000 and 5,000 generated images, images/s and peak memory
  (benchmark_references.py);
- ``pytest``: the pytest-benchmark suites (tests/benchmarks), from their JSON.
GPU results (docs/gpu_*.md, written by python/gpu/gpu_check) are included as they are.
Hand-written reasoning about the figures lives in docs/benchmarks_notes.md.
"""
import argparse
import datetime
import glob
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # python/benchmarks/ is two below
PYTHON = sys.executable


def script(name, *args):
    return [PYTHON, os.path.join(ROOT, 'python', 'benchmarks', name), *map(str, args)]


def evaluate_at_scale(run, *args):
    """``lxt-ext evaluate`` on generated images under torchrun, 2 processes of 1 thread, into {tmp}/faithfulness/run."""
    return [PYTHON, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--master_port=29731', '-m', 'lxt_ext',
            'evaluate', *map(str, args), '--threads', 1, '--quiet', '--out', '{tmp}/faithfulness/' + run]


# name -> (title, full command(s), quick command(s), what it shows)
SECTIONS = {
    'cnn': ('CNN rules vs zennit (EpsilonGammaBox, batch 4, 224 x 224, 2 threads)',
            [script('benchmark_time.py', 'vgg16', 'resnet50', '--repeats', 5),
             script('benchmark_memory.py', 'vgg16', 'resnet50')],
            [script('benchmark_time.py', 'resnet18', '--repeats', 1), script('benchmark_memory.py', 'resnet18')],
            'time and extra peak memory of zennit and lxt_ext relative to plain forward+backward'),
    'vit': ('Vision Transformer vs LXT 2.1 (torchvision vit_b_16, random weights, batch 4, 2 threads)',
            [script('benchmark_vit.py', '--repeats', 5),
             script('benchmark_vit.py', '--interleaved', '--methods', 'plain', 'lxt_ext_epsilon', 'lxt_ext_gamma',
                    '--repeats', 7)],
            [script('benchmark_vit.py', '--repeats', 1, '--batch', 1, '--methods', 'plain', 'lxt_ext_epsilon')],
            'time and extra peak memory, each method in its own process; then plain and lxt_ext\'s composites '
            'interleaved in one process (the ratio under the same load)'),
    'language': ('Language model vs LXT 2.1 (LLaMA-style decoder, 8 layers, width 512, GQA 8/2, 2,048 tokens)',
                 [script('benchmark_language.py', '--repeats', 7, '--relevance')],
                 [script('benchmark_language.py', '--tokens', 128, '--repeats', 1)],
                 'AttnLRP relevance of the top logit at the last token, each method in its own process'),
    'generation': ('Generated text explained from one forward vs the step-by-step loop (the decoder above, 512 prompt '
                   'tokens, 64 generated)',
                   [script('benchmark_generation.py', '--prompt', 512, '--generated', 64, '--repeats', 3)],
                   [script('benchmark_generation.py', '--prompt', 32, '--generated', 4, '--repeats', 1)],
                   'AttnLRP relevance of every generated token\'s logit: the whole answer in one backward, the '
                   'token-to-token matrix one backward per generated token, against a forward and a backward per '
                   'step on the growing prefix'),
    'long_context': ('Long contexts: the lengths each method explains (the decoder above, 2k-64k tokens, 15 minutes '
                     'and 20 GiB per run)',
                     [script('benchmark_long_context.py')],
                     [script('benchmark_long_context.py', '--lengths', 256, '--methods', 'plain', 'lxt_ext',
                             'lxt_eager', '--cap', 300)],
                     'one attribution per method and length in a fresh process, time and extra peak memory, or '
                     'why it did not finish (hours on 2 cores: run it with --only long_context)'),
    'attention': ('Attention alone, 1k-16k tokens (4 heads, D = 64, forward+backward)',
                  [script('benchmark_attention.py', '--lengths', 1024, 2048, 4096, 8192, 16384, '--repeats', 5)],
                  [script('benchmark_attention.py', '--lengths', 256, 512, '--repeats', 1)],
                  'extra peak memory grows linearly for lxt_ext, quadratically for the eager recipe'),
    'explain': ('Command-line throughput: lxt-ext explain (vit_b_16, random weights, 2 threads)',
                [script('benchmark_explain.py', '--images', 32, '--batches', 4, 16)],
                [script('benchmark_explain.py', '--images', 2, '--batches', 2, '--methods', 'vit_epsilon')],
                'images/s of the command (decoding, writing) against the same composite in a loop'),
    'checks': ("The per-layer NaN/Inf checks' share (lxt_ext.checks, CPU)",
               [script('benchmark_checks.py', 'vit_b_16', 'decoder', '--repeats', 9)],
               [script('benchmark_checks.py', 'vit_b_16', '--repeats', 1, '--batch', 1)],
               'attribution time with the per-layer checks on (the default) and off, interleaved in one process, in '
               "zennit-style use (ViTEpsilon, batch 4; the decoder of the language section); lxt_ext's attributors "
               'defer them (no cost while values are finite)'),
    'operations': ("The operation rules' share (lxt_ext.operations: the decoder and vit_b_16, 2 threads)",
                   [script('benchmark_operations.py', '--rounds', 21)],
                   [script('benchmark_operations.py', '--rounds', 3, '--tokens', 128, '--models', 'decoder')],
                   'attribution time with the operation rules and without them (the composite as before they '
                   'existed), alternating in one process; the ratio per round, its median and 95 % interval'),
    'quantus': ("Perturbation curves vs Quantus 0.6 (region perturbation, every step): values and time against the "
                "batched forwards they need",
                [script('benchmark_quantus.py', '--workloads', 'embedded', '--repeats', 9),
                 script('benchmark_quantus.py', '--workloads', 'vit_b_16', '--images', 8, '--repeats', 1),
                 script('benchmark_quantus.py', '--workloads', 'generated', '--generated', 1000, '--repeats', 1)],
                [script('benchmark_quantus.py', '--workloads', 'embedded', '--repeats', 1)],
                'lxt_ext.evaluation.perturbation_curve (batched) and quantus.RegionPerturbation (per sample) on the '
                'embedded model (12 samples, 8 x 8 patches, 64 steps) and vit_b_16 (8 images, 224 x 224, 16 x 16 '
                'patches, 196 steps), interleaved in one process'),
    'zoo': ('The zoos: every transformers model type and timm vision-transformer architecture explained or refused',
            [script('zoo_sweep.py', '--out', '{tmp}/zoo', '--jobs', 2)],
            [script('zoo_sweep.py', '--zoo', 'causal_lm', 'llama', '--out', '{tmp}/zoo')],
            'verdicts per zoo (zoo_sweep.py: tiny random-weight models, offsets zeroed; exact = CP-LRP conserves, '
            'the forward is unchanged and AttnLRP runs); the per-type tables are docs/zoo/*.md'),
    'evaluation': ('Evaluation throughput: lxt-ext evaluate on the embedded model',
                   [[PYTHON, '-m', 'lxt_ext', 'evaluate', '--out', '{tmp}/evaluate', '--threads', 2, '--quiet']],
                   [[PYTHON, '-m', 'lxt_ext', 'evaluate', '--out', '{tmp}/evaluate', '--threads', 2, '--quiet',
                     '--limit', 2, '--max-steps', 4]],
                   'perturbation curves and localisation per method; seconds per image'),
    'faithfulness': ('Faithfulness at scale: attribution methods on thousands of generated held-out images and on real text',
                     [evaluate_at_scale('attnlrp', '--protocol', 'attnlrp', '--generate', 2000),
                      evaluate_at_scale('dynamiclrp', '--protocol', 'dynamiclrp', '--generate', 1000),
                      evaluate_at_scale('gamma_search', '--protocol', 'attnlrp', '--generate', 500, '--gamma-search'),
                      script('evaluate_text.py', '--threads', 2, '--out', '{tmp}/faithfulness/text')],
                     [evaluate_at_scale('attnlrp', '--protocol', 'attnlrp', '--generate', 8, '--max-steps', 4,
                                        '--methods', 'vit_epsilon:attnlrp,gradient_x_input'),
                      script('evaluate_text.py', '--threads', 2, '--sentences', 4, '--out', '{tmp}/faithfulness/text')],
                     'lxt-ext evaluate --generate under torchrun (2 processes of 1 thread; the statistics fixed before '
                     'the run: ABPC primary, 95 % percentile-bootstrap intervals over the images, paired bootstrap '
                     'differences Holm-corrected across the pairs) with the AttnLRP protocol (2,000 images) and the DynamicLRP '
                     'protocol (1,000), the ViTGamma grid on 500 images, and token deletion on real sentences with the pretrained '
                     'all-MiniLM-L6-v2 (evaluate_text.py)'),
    'references': ('Reference samples over a data set: lxt-ext references streaming generated images (embedded model)',
                   [script('benchmark_references.py', '--images', 1000, 5000, '--threads', 1)],
                   [script('benchmark_references.py', '--images', 40, 80, '--units', '0-3')],
                   'images/s of the search and peak RSS of the whole command (fresh processes, mmapped allocations) '
                   'for 1,000 and 5,000 images, all 128 MLP neurons of the last block, k = 8; the goal: the peak at '
                   '5,000 within 10 % of the peak at 1,000'),
    'pytest': ('pytest-benchmark suites (tests/benchmarks)',
               [[PYTHON, '-m', 'pytest', '-q', os.path.join(ROOT, 'tests', 'benchmarks'), '--benchmark-enable',
                 '--benchmark-json={tmp}/pytest_benchmark.json', '-p', 'no:cacheprovider']],
               [[PYTHON, '-m', 'pytest', '-q', os.path.join(ROOT, 'tests', 'benchmarks'), '-p', 'no:cacheprovider']],
               'median seconds per case from pytest-benchmark\'s JSON'),
}


# sections the full suite leaves out (hours): run them with --only
SEPARATE = ('long_context', 'faithfulness')


def faithfulness_outputs(folder, figures):
    """The faithfulness section's results: each run's markdown (what lxt-ext evaluate and evaluate_text.py
    wrote into ``folder``), its PNG copied into ``figures`` as ``faithfulness_<run>.png``."""
    import shutil

    outputs = []
    for run in sorted(os.listdir(folder)):
        found = sorted(glob.glob(os.path.join(folder, run, '*.md')))
        if not found:
            raise FileNotFoundError(f'the faithfulness run {run} wrote no markdown into {folder}/{run}')
        with open(found[0]) as file:
            # the runs' own headings sit below the run's (the report's sections are its '## ' lines)
            text = '\n'.join('#### ' + line.lstrip('#').strip() if line.startswith('#') else line
                              for line in file.read().strip().splitlines())
        outputs.append(f'### {run}\n\n{text}')
        for png in sorted(glob.glob(os.path.join(folder, run, '*.png')))[:1]:
            shutil.copyfile(png, os.path.join(figures, f'faithfulness_{run}.png'))
            outputs.append(f'![{run}](benchmarks/faithfulness_{run}.png)')
    return outputs


def markdown_tables(text):
    """The markdown tables in ``text``: a list of (header cells, rows of cells)."""
    tables, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith('|') and i + 1 < len(lines) and re.match(r'^\|[-| :]+\|$', lines[i + 1]):
            header = [c.strip() for c in lines[i].strip('|').split('|')]
            rows = []
            i += 2
            while i < len(lines) and lines[i].startswith('|'):
                rows.append([c.strip() for c in lines[i].strip('|').split('|')])
                i += 1
            tables.append((header, rows))
        else:
            i += 1
    return tables


def number(cell):
    match = re.search(r'-?\d+(\.\d+)?', cell)
    return float(match.group()) if match else None


def pytest_table(path):
    with open(path) as file:
        data = json.load(file)
    lines = ['| case | median s | min s | rounds |', '|---|---|---|---|']
    for bench in data['benchmarks']:
        stats = bench['stats']
        lines.append(f"| {bench['fullname'].split('::')[-1]} ({bench['fullname'].split('/')[-1].split('::')[0]}) | "
                     f"{stats['median']:.4f} | {stats['min']:.4f} | {stats['rounds']} |")
    return '\n'.join(lines)


def evaluation_table(folder):
    path = next(iter(glob.glob(os.path.join(folder, '*.md'))), None)
    if path is None:
        raise FileNotFoundError(f'lxt-ext evaluate wrote no markdown table into {folder}')
    with open(path) as file:
        return file.read().strip()


def plot(name, tables, path):
    """A PNG of the section's ratio columns (one bar group per row), or None when it has none."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    series = []
    for header, rows in tables:
        columns = [j for j, h in enumerate(header) if '/' in h or 'ratio' in h.lower() or 'images/s' in h]
        for j in columns:
            values = [(row[0] + (f' {row[1]}' if name in ('attention', 'explain') else ''), number(row[j]))
                      for row in rows if j < len(row) and number(row[j]) is not None]
            if values:
                series.append((header[j], values))
    if not series:
        return None
    labels = list(dict.fromkeys(label for _, values in series for label, _ in values))
    figure, axis = plt.subplots(figsize=(max(6, 1.2 * len(labels) + 2), 3.6))
    width = 0.8 / len(series)
    for k, (title, values) in enumerate(series):
        lookup = dict(values)
        axis.bar([i + k * width for i in range(len(labels))], [lookup.get(label, 0) for label in labels], width,
                 label=title)
    axis.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(labels))])
    axis.set_xticklabels(labels, rotation=20, ha='right', fontsize=8)
    axis.axhline(1.0, color='grey', linewidth=0.8)
    axis.legend(fontsize=7)
    axis.set_title(name)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def header(args, load_before):
    from importlib.metadata import PackageNotFoundError, version

    import torch

    cpu = next((line.split(':', 1)[1].strip() for line in open('/proc/cpuinfo') if line.startswith('model name')),
               platform.processor())
    versions = [f'Python {platform.python_version()}']
    for package in ('torch', 'zennit', 'lxt_ext', 'transformers', 'timm'):
        try:
            versions.append(f'{package} {version(package)}')
        except PackageNotFoundError:
            pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'
    return [
        '# Benchmarks (generated)',
        '',
        f'Generated by `python python/benchmarks/benchmark_report.py{" --quick" if args.quick else ""}` on '
        f'{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; do not edit by hand (the reasoning about '
        f'these figures is in [benchmarks_notes.md](benchmarks_notes.md)).',
        '',
        f'- Machine: {cpu}, {os.cpu_count()} CPU cores, GPU: {gpu}',
        f'- Versions: {", ".join(versions)}',
        '- Threads: 2 torch threads per measured process (`torch.set_num_threads(2)`) unless a section says otherwise',
        f'- Load average (1 min) at the start: {load_before:.2f}',
        '- Quick mode: small sizes, a smoke test; the figures mean nothing.' if args.quick else '',
    ]


def split_sections(text):
    """``(preamble lines, [(heading, lines), ...])`` of a report: a block per ``## `` heading."""
    preamble, blocks = [], []
    for line in text.splitlines():
        if line.startswith('## '):
            blocks.append((line, [line]))
        elif blocks:
            blocks[-1][1].append(line)
        else:
            preamble.append(line)
    return preamble, blocks


def merge(previous, blocks, gpu, note):
    """The previous report with the re-run sections' blocks (``blocks``: heading -> lines) in place of theirs
    (new ones before the GPU section), the GPU section ``gpu`` anew and ``note`` added to the header."""
    preamble, old = split_sections(previous)
    while preamble and not preamble[-1].strip():
        preamble.pop()
    kept = [(heading, blocks.pop(heading, lines)) for heading, lines in old if heading != '## GPU']
    sections = kept + list(blocks.items())
    return '\n'.join(preamble + [note, ''] + [line for _, lines in sections for line in lines] + gpu)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true', help='small sizes: a smoke test of the whole report')
    parser.add_argument('--only', nargs='+', choices=list(SECTIONS),
                        help='run only these sections; an existing report keeps its other sections')
    parser.add_argument('--out', default=os.path.join(ROOT, 'docs', 'benchmarks.md'))
    args = parser.parse_args()
    out_dir = os.path.dirname(os.path.abspath(args.out))
    figures = os.path.join(out_dir, 'benchmarks')
    os.makedirs(figures, exist_ok=True)
    load_before = os.getloadavg()[0]
    blocks = {}
    failed = []
    env = dict(os.environ, OMP_WAIT_POLICY='PASSIVE')
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only or [name for name in SECTIONS if name not in SEPARATE]:
            title, full, quick, what = SECTIONS[name]
            commands = [[part.format(tmp=tmp) for part in map(str, command)] for command in (quick if args.quick else full)]
            print(f'== {name}: {title}', file=sys.stderr, flush=True)
            lines = [f'## {title}', '', f'{what}. Command{"s" if len(commands) > 1 else ""}:', '']
            lines += ['    python ' + ' '.join('{tmp}' + p[len(tmp):] if p.startswith(tmp) else
                                            os.path.relpath(p, ROOT) if p.startswith(ROOT) else p for p in command[1:])
                      for command in commands]
            outputs = []
            start, load = time.perf_counter(), os.getloadavg()[0]
            for command in commands:
                process = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
                if process.returncode != 0:
                    failed.append(name)
                    outputs.append(f'**failed** (exit {process.returncode}):\n\n```\n{process.stderr[-2000:]}\n```')
                    break
                outputs.append(process.stdout.strip())
            if name == 'pytest' and name not in failed:
                # quick mode runs the suites once each as smoke tests (the project's --benchmark-disable): no JSON
                outputs = [pytest_table(os.path.join(tmp, 'pytest_benchmark.json')) if not args.quick else
                           f'smoke run, no timings: {outputs[0].splitlines()[-1]}']
            if name == 'zoo' and name not in failed:
                with open(os.path.join(tmp, 'zoo', 'summary.md')) as file:
                    outputs = ['\n'.join(line for line in file.read().splitlines() if line.startswith('|'))]
            if name == 'evaluation' and name not in failed:
                outputs = [evaluation_table(os.path.join(tmp, 'evaluate'))]
            if name == 'faithfulness' and name not in failed:
                outputs = faithfulness_outputs(os.path.join(tmp, 'faithfulness'), figures)
            lines += ['', f'Load average at the start of the section: {load:.2f}; '
                      f'{time.perf_counter() - start:.0f} s in all.', '']
            text = '\n\n'.join(outputs)
            lines.append(text)
            png = None if name == 'faithfulness' else plot(name, markdown_tables(text), os.path.join(figures, f'{name}.png'))
            if png is not None:
                lines += ['', f'![{name}](benchmarks/{name}.png)']
            blocks[f'## {title}'] = lines + ['']
    gpu_files = sorted(glob.glob(os.path.join(ROOT, 'docs', 'gpu_*.md')))
    gpu = ['## GPU', '']
    if gpu_files:
        for path in gpu_files:
            with open(path) as file:
                gpu += [f'From `{os.path.relpath(path, ROOT)}`, as written by the GPU check:', '', file.read().strip(), '']
    else:
        gpu.append('No GPU results yet: no GPU was lent to this project\'s sessions so far (python/gpu/gpu_check runs them).')
    gpu += ['', f'Load average (1 min) at the end: {os.getloadavg()[0]:.2f}', '']
    if args.only and os.path.exists(args.out):
        with open(args.out) as file:
            previous = file.read()
        note = (f'- Re-run on {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC (load average '
                f'{load_before:.2f} at the start): {", ".join(args.only)}')
        text = merge(previous, blocks, gpu, note)
    else:
        text = '\n'.join(header(args, load_before) + [''] + [line for lines in blocks.values() for line in lines] + gpu)
    with open(args.out, 'w') as file:
        file.write(text)
    print(f'wrote {args.out}' + (f'; failed sections: {", ".join(failed)}' if failed else ''), file=sys.stderr)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
