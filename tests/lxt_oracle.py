"""Runs LXT 2.1, the transformers oracle, in a subprocess of its own environment.

LXT 2.1's ``lxt.efficient`` needs transformers 4.x while lxt_ext targets transformers 5.x, so the
oracle lives in ``.oracle/`` (``pip install --target .oracle --no-deps -r requirements-oracle.txt``,
done by ``.ci/run`` and ``python/quickstart.sh``), put first on ``PYTHONPATH`` of a child python that
shares the main venv's torch, torchvision and zennit. Tests hand it tensors and state dicts, it
hands back tensors: both sides build the same random-weight model from the same weights.
"""
import os
import subprocess
import sys
import tempfile
import textwrap

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# LXT_ORACLE_PATH points the tests at another oracle environment (or, to check the missing-oracle
# policy of tests/conftest.py, at none)
ORACLE_PATH = os.environ.get('LXT_ORACLE_PATH') or os.path.join(ROOT, '.oracle')

_PRELUDE = '''
import sys, torch
torch.set_num_threads(2)
inputs = torch.load(sys.argv[1], weights_only=False)
outputs = {}
'''
_EPILOGUE = '''
torch.save(outputs, sys.argv[2])
'''


def available():
    return os.path.isdir(os.path.join(ORACLE_PATH, 'lxt'))


def run(script, **inputs):
    """Run ``script`` under LXT 2.1 + transformers 4.57.6. It reads the dict ``inputs`` and fills
    the dict ``outputs``, which is returned (tensors, state dicts and plain data only)."""
    if not available():
        raise RuntimeError(
            f'the LXT 2.1 oracle environment is missing at {ORACLE_PATH}; create it with '
            f'`{sys.executable} -m pip install --target .oracle --no-deps -r requirements-oracle.txt`'
        )
    with tempfile.TemporaryDirectory() as tmp:
        source, sink = os.path.join(tmp, 'in.pt'), os.path.join(tmp, 'out.pt')
        torch.save(inputs, source)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ORACLE_PATH, os.environ.get('PYTHONPATH')])),
                   HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1')
        code = _PRELUDE + textwrap.dedent(script) + _EPILOGUE
        result = subprocess.run([sys.executable, '-c', code, source, sink], env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f'the LXT oracle failed:\n{result.stderr[-4000:]}')
        return torch.load(sink, weights_only=False)
