"""The benchmarks' measurement helpers (python/benchmarks/harness), checked on calls whose cost is known in
advance."""
from conftest import BENCHMARKS
from harness.process import interleaved_processes, last_line
from harness.timing import interleaved_medians

# The children run from a temporary folder: harness is found through the path they are given here.
ALLOCATE = f'''
import sys
sys.path.insert(0, {BENCHMARKS!r})
import torch
from harness.memory import extra_peak_mb

def run():
    x = torch.ones(int(sys.argv[1]) * 2 ** 18)  # float32: 1 MB per 2^18 elements, freed on return
    x.add_(1)
run()  # the first call also brings in torch's thread pool and kernels, as a benchmark's warm-up does
print(extra_peak_mb(run))
'''


def test_extra_peak_memory_of_a_known_allocation(tmp_path):
    """64 MB live for a moment read as 64 MB, in a process of its own under the mmap allocator."""
    script = tmp_path / 'allocate.py'
    script.write_text(ALLOCATE)
    assert 63.5 < float(last_line(script, [64], memory=True)) < 64.5


def test_interleaved_medians_warm_up_then_alternate():
    calls = []
    medians = interleaved_medians({'a': lambda: calls.append('a'), 'b': lambda: calls.append('b')}, repeats=3)
    assert calls == ['a', 'b'] * 4
    assert set(medians) == {'a', 'b'} and all(m >= 0 for m in medians.values())


SERVE = f'''
import sys, time
sys.path.insert(0, {BENCHMARKS!r})
from harness.process import serve
serve(lambda: time.sleep(float(sys.argv[1])))
'''


def test_interleaved_processes_take_turns_and_time_each_run(tmp_path):
    """Two children sleeping 20 and 60 ms a run: their medians tell them apart, one process each."""
    script = tmp_path / 'serve.py'
    script.write_text(SERVE)
    medians = interleaved_processes({'short': (script, [0.02], None), 'long': (script, [0.06], {'X': '1'})},
                                    repeats=3)
    assert 0.02 <= medians['short'] < 0.05 and 0.06 <= medians['long'] < 0.09
