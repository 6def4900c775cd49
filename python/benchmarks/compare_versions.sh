#!/usr/bin/env bash
# The CNN, ViT and decoder benchmarks of two versions of lxt_ext, alternating per round in one run, so that both
# see the same load: each round runs the other version's scripts with its package first on PYTHONPATH, then this
# tree's. Ratios to plain autograd are comparable across versions; absolute times only within a round.
#   python/benchmarks/compare_versions.sh OTHER_CHECKOUT [ROUNDS]
# OTHER_CHECKOUT: a checkout whose extension is built in place, e.g.
#   git worktree add /tmp/old <rev> && (cd /tmp/old && LXT_EXT_NO_CUDA=1 python setup.py build_ext --inplace)
# (before 0.3 its scripts are in python/, since 0.3 in python/benchmarks/).
set -euo pipefail
other=$(cd "$1" && pwd); rounds=${2:-3}
here=$(cd "$(dirname "$0")/../.." && pwd)
python=${PYTHON:-$here/.venv/bin/python}
scripts() { if [ -d "$1/python/benchmarks" ]; then echo "$1/python/benchmarks"; else echo "$1/python"; fi; }
for round in $(seq "$rounds"); do
  for root in "$other" "$here"; do
    dir=$(scripts "$root")
    export PYTHONPATH=$root
    echo "=== round $round: $root"
    (cd "$root" && "$python" "$dir/benchmark_vit.py" --interleaved --methods plain lxt_ext_epsilon lxt_ext_gamma --repeats 5)
    (cd "$root" && "$python" "$dir/benchmark_language.py" --methods plain lxt_ext --repeats 5)
    (cd "$root" && "$python" "$dir/benchmark_time.py" resnet50 --repeats 3)
  done
done
