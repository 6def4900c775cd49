"""python/benchmarks/benchmark_report.py --quick (the CI smoke test of the one benchmark report): every section
runs its scripts and lands in the report as a table of measured numbers with a plot, with the machine and
versions."""
import os
import re
import subprocess
import sys
from conftest import ROOT

REPORT = os.path.join(ROOT, 'python', 'benchmarks', 'benchmark_report.py')
SECTIONS = ['cnn', 'vit', 'language', 'generation', 'long_context', 'attention', 'explain', 'checks', 'operations',
            'quantus', 'zoo', 'evaluation', 'references']


def test_quick_report_has_every_section(tmp_path):
    out = tmp_path / 'benchmarks.md'
    process = subprocess.run([sys.executable, REPORT, '--quick',
                              '--only', *SECTIONS, '--out', str(out)], capture_output=True, text=True, timeout=1500)
    assert process.returncode == 0, process.stderr[-3000:]
    text = out.read_text()
    assert 'Versions: Python' in text and 'Load average (1 min) at the end' in text
    sections = re.split(r'^## ', text, flags=re.M)[1:]
    assert len(sections) == len(SECTIONS) + 1  # and the GPU section
    for section in sections[:-1]:
        rows = [line for line in section.splitlines() if line.startswith('|') and not line.startswith('|---')]
        numbers = [float(x) for row in rows[1:] for x in re.findall(r'(?<![\w.])\d+\.\d+', row)]
        assert numbers and all(x == x for x in numbers), section[:400]
    for name in ('cnn', 'vit', 'attention', 'explain'):
        assert (tmp_path / 'benchmarks' / f'{name}.png').stat().st_size > 1000


def test_rerunning_some_sections_keeps_the_others():
    """``--only`` on an existing report: the re-run sections replace theirs in place, a new one goes before the
    GPU section, the other sections stay as they were, the header says what was re-run."""
    import importlib.util
    spec = importlib.util.spec_from_file_location('benchmark_report', REPORT)
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    previous = '\n'.join(['# Benchmarks (generated)', '', '- Load average: 1.00', '', '## A', '', 'old a', '',
                          '## B', '', 'old b', '', '## GPU', '', 'none', '', 'Load average (1 min) at the end: 1.00', ''])
    blocks = {'## B': ['## B', '', 'new b', ''], '## C': ['## C', '', 'new c', '']}
    merged = report.merge(previous, blocks, ['## GPU', '', 'none yet', ''], '- Re-run: b, c')
    assert merged == '\n'.join(['# Benchmarks (generated)', '', '- Load average: 1.00', '- Re-run: b, c', '',
                                '## A', '', 'old a', '', '## B', '', 'new b', '', '## C', '', 'new c', '',
                                '## GPU', '', 'none yet', ''])
