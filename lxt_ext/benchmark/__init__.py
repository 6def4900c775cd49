"""What the benchmark scripts (``python/``) and the pytest-benchmark suites (``tests/benchmarks/``) share.

``memory``: extra peak memory of one call (VmRSS, clear_refs, VmHWM); ``process``: a measurement in a
fresh process of its own; ``timing``: interleaved medians; ``models``: the seeded random-weight models
and the runs (plain forward+backward, zennit's Gradient with a composite) that are measured;
``attention``: the attention methods of the attention benchmark. Not imported by the rest of lxt_ext.
"""
