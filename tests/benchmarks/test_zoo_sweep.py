"""The zoo sweep (python/benchmarks/zoo_sweep.py) on a type lxt_ext explains exactly and on one it refuses: the
verdicts, the JSON and the table it writes."""
import json

import pytest

pytest.importorskip('transformers')
import zoo_sweep  # noqa: E402  (python/benchmarks is on the path: tests/conftest.py)


def test_verdicts_json_and_table(tmp_path):
    assert zoo_sweep.main(['llama', 'bloom', '--out', str(tmp_path), '--seconds', '300']) == 0
    results = json.loads((tmp_path / 'causal_lm.json').read_text())
    assert results['llama']['verdict'] == 'exact' and results['llama']['error'] <= 1e-3
    # BLOOM computes attention in its own forward (ALiBi): lxt_ext refuses it by name at registration
    assert results['bloom']['verdict'] == 'refused' and 'BloomAttention' in results['bloom']['detail']
    table = (tmp_path / 'causal_lm.md').read_text()
    assert '| exact | 1 |' in table and '| refused | 1 |' in table and '| llama | exact |' in table
