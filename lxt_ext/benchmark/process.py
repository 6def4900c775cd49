"""A measurement in a fresh process, so that no other measurement's memory or warm state is in it."""
import os
import subprocess
import sys

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
