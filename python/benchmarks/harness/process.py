"""A measurement in a fresh process, so that no other measurement's memory or warm state is in it."""
import os
import statistics
import subprocess
import sys
import time

from .memory import MEMORY_ENV


def last_line(script, args, memory=False, env=None):
    """The last line that ``python script *args`` prints; with ``memory``, run under ``MEMORY_ENV``
    (the allocator for peak-memory figures; time runs keep the default allocator). ``env`` adds to or
    overrides this process's environment."""
    child_env = dict(os.environ, **(env or {}))
    if memory:
        child_env.update(MEMORY_ENV)
    out = subprocess.run([sys.executable, script, *map(str, args)], env=child_env, check=True,
                         capture_output=True, text=True).stdout
    return out.strip().splitlines()[-1]


def interleaved_processes(children, repeats):
    """``{name: median seconds}`` of one run each in processes of their own, interleaved like
    ``timing.interleaved_medians``: methods that cannot share a process (another environment) are timed
    round by round under the same load. ``children``: ``{name: (script, args, env)}``, each a process
    that prints a line ``ready`` once set up, then answers each input line ``run`` with the seconds one
    run took (``serve``). The first round is a warm-up; idle children wait on their input."""
    procs = {}
    try:
        for name, (script, args, env) in children.items():
            procs[name] = subprocess.Popen([sys.executable, script, *map(str, args)],
                                           env=dict(os.environ, **(env or {})), stdin=subprocess.PIPE,
                                           stdout=subprocess.PIPE, text=True)
            if procs[name].stdout.readline().strip() != 'ready':
                raise RuntimeError(f'{name}: the benchmark process did not start (exit {procs[name].wait()})')
        times = {name: [] for name in children}
        for round_ in range(repeats + 1):
            for name, proc in procs.items():
                proc.stdin.write('run\n')
                proc.stdin.flush()
                line = proc.stdout.readline()
                if not line:
                    raise RuntimeError(f'{name}: the benchmark process died (exit {proc.wait()})')
                if round_:
                    times[name].append(float(line))
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()
    return {name: statistics.median(values) for name, values in times.items()}


def serve(run):
    """The child side of ``interleaved_processes``: ``ready``, then the seconds of ``run()`` per ``run`` line."""
    print('ready', flush=True)
    for line in sys.stdin:
        if line.strip() != 'run':
            break
        start = time.perf_counter()
        run()
        print(time.perf_counter() - start, flush=True)
