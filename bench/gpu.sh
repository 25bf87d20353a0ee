#!/usr/bin/env bash
# The whole-model benchmark on a borrowed GPU machine that has PyTorch but no package index (bench/README.md,
# "On a GPU machine").
#
#   bash bench/gpu.sh wheels               # where PyPI is reachable: the pure-Python packages such an image
#                                          # lacks, as wheels in .whl/ (git-ignored), at the versions of .venv
#   bash bench/gpu.sh run MODEL [ARGS...]  # on the GPU machine: installs .whl/ into /tmp/site, then
#                                          # bench/train_step.py --model MODEL --preset full ARGS..., report in
#                                          # $OUT (or bench/results/ when OUT is unset)
#
# Every method gets its own spawned process and at most
# --timeout seconds per batch size (default here 120), and the report is rewritten after every method, so a
# call stopped from outside still returns what finished.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(diffusers lycoris-lora peft toml importlib_metadata zipp)

case "${1:-}" in
  wheels)
    py=python3
    [ -x .venv/bin/python ] && py=.venv/bin/python
    specs=()
    for p in "${PACKAGES[@]}"; do
      v=$("$py" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$p" 2>/dev/null || true)
      specs+=("$p${v:+==$v}")
    done
    rm -rf .whl
    "$py" -m pip download --quiet --no-deps --only-binary=:all: -d .whl "${specs[@]}"
    ls .whl
    ;;
  run)
    model=${2:?"usage: bash bench/gpu.sh run MODEL [ARGS...] (MODEL: sd15, sdxl, tiny-sd1, tiny-sdxl)"}
    shift 2
    if [ -d .whl ]; then
      python3 -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
      export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    out=${OUT:-bench/results}
    mkdir -p "$out"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    PYTHONUNBUFFERED=1 python3 bench/train_step.py --model "$model" --preset full --timeout 120 \
      --out "$out/train_step_$model.md" "$@"
    ;;
  *)
    echo "usage: bash bench/gpu.sh wheels | bash bench/gpu.sh run MODEL [ARGS...]" >&2
    exit 2
    ;;
esac
