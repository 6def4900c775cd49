"""The built wheel carries the embedded model and its samples (package data), not only the source tree:
installed from the wheel into a folder of its own and imported from there (outside the repository), the
model loads with its checksum and ``lxt-ext explain`` runs on the shipped samples.

The wheel is built by .ci/run (``LXT_EXT_WHEEL`` names it; building one compiles the extension, minutes on
2 cores, so the test does not build its own)."""
import json
import os
import subprocess
import sys
import zipfile

from conftest import require

WHEEL = os.environ.get('LXT_EXT_WHEEL')
require(WHEEL and os.path.isfile(WHEEL), 'no built wheel: set LXT_EXT_WHEEL to a wheel of lxt_ext (.ci/run does)')


def test_wheel_holds_the_embedded_model_and_samples():
    with zipfile.ZipFile(WHEEL) as wheel:
        names = wheel.namelist()
    embedded = [n for n in names if n.startswith('lxt_ext/data/embedded/')]
    assert any(n.endswith('.png') for n in embedded), embedded
    assert any(n.endswith(('.pt', '.safetensors')) for n in embedded), embedded
    assert any(n.startswith('lxt_ext/_C') for n in names)


def test_the_installed_wheel_explains_its_samples(tmp_path):
    target = tmp_path / 'site'
    subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '--no-deps', '--target', str(target), WHEEL],
                   check=True)
    env = {**os.environ, 'PYTHONPATH': str(target)}
    script = ('import lxt_ext, lxt_ext.data.embedded as e; m = e.load_model(); s = e.load_samples(); '
              'print(lxt_ext.__file__); print(len(s[0]))')
    out = subprocess.run([sys.executable, '-c', script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[0].startswith(str(target)), out  # imported from the wheel, not the source tree
    assert int(out[1]) > 0
    explained = tmp_path / 'explained'
    subprocess.run([sys.executable, '-m', 'lxt_ext', 'explain', '--out', str(explained), '--quiet', '--workers', '0'],
                   cwd=tmp_path, env=env, check=True)
    rows = [json.loads(line) for line in (explained / 'index.jsonl').read_text().splitlines()]
    assert len(rows) == int(out[1])
    assert all((explained / row['heatmap']).exists() for row in rows)
