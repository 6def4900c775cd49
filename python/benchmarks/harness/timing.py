"""Times as ratios need them: every method measured in the same run, under the same load."""
import statistics
import time


def interleaved_medians(runs, repeats, warm_up=True):
    """``{name: median seconds}`` of the callables ``runs`` (a dict): one warm-up call of each (unless
    ``warm_up`` is False: runs long enough to need none), then ``repeats`` rounds calling each once in turn, so
    that load from other processes hits all alike."""
    times = {name: [] for name in runs}
    for run in runs.values() if warm_up else ():
        run()
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}
