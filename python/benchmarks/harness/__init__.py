"""What the benchmark scripts (``python/benchmarks/``) and the pytest-benchmark suites (``tests/benchmarks/``)
share; not part of the installed package (nothing in lxt_ext uses it, so the wheel does not ship it).

``memory``: extra peak memory of one call (VmRSS, clear_refs, VmHWM); ``process``: a measurement in a
fresh process of its own; ``timing``: interleaved medians; ``models``: the seeded random-weight models
and the runs (plain forward+backward, zennit's Gradient with a composite) that are measured;
``attention``: the attention methods of the attention benchmark.

Imported as ``harness``: a script run as ``python python/benchmarks/<script>.py`` has its own folder first
on ``sys.path``; the tests put that folder there in ``tests/conftest.py``.
"""
