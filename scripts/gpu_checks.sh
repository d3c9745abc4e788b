#!/usr/bin/env bash
# The pack's checks that need a CUDA GPU, as one script for a short lease of a GPU machine.
#
#   scripts/gpu_checks.sh prepare       here, with PyPI: the wheels the GPU machine lacks into .whl/, and
#                                       ComfyUI's working tree into ComfyUI/ (both ignored by git)
#   scripts/gpu_checks.sh run [PART...] there: PARTs of tests, training, sampling (default: all three)
#
# `run` writes one log per part into $OUT (or out/gpu_checks) and exits non-zero if any part failed:
#   tests     tests/unit/test_training_cuda.py (PyTorch's CUDA sync check; CUDA against the CPU)
#   training  benches/bench_training.py --device cuda against sparsify, paper size, fp32 then tf32
#   sampling  benches/bench_gpu.py: SDXL and FLUX.1 with random weights, plain vs patched, with syncs counted
# Each part has its own time limit (seconds: TESTS_S, TRAINING_S, SAMPLING_S); TOKENS sets the training
# bench's tokens per trainer (default 8388608, the issue's 8.4 M). SMOKE=1 runs the same parts on the CPU at
# tiny sizes (sparsify's wheels only), to check the script here: its figures mean nothing.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

# Versions tested with this pack: ComfyUI's dependencies that a bare CUDA image lacks, and what
# benches/bench_training.py needs of sparsify.
COMFYUI_WHEELS=(torchsde==0.2.6 trampoline==0.1.2 pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3
                python-dotenv==1.2.4 annotated-types==0.8.0 typing-inspection==0.4.5)
SPARSIFY_WHEELS=(eai-sparsify==1.3.3 simple-parsing==0.1.8 docstring-parser==0.17.0 natsort==8.4.0)

exclude() {  # keep a prepared folder out of git without touching .gitignore
  mkdir -p .git/info
  grep -qxF "/$1/" .git/info/exclude 2>/dev/null || echo "/$1/" >> .git/info/exclude
}

prepare() {
  local py=${PYTHON:-python3}
  exclude .whl
  mkdir -p .whl
  local p
  for p in "${COMFYUI_WHEELS[@]}" "${SPARSIFY_WHEELS[@]}"; do
    "$py" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform any -d .whl "$p" || { echo "prepare: cannot download $p" >&2; return 1; }
  done
  local comfy
  comfy=$("$py" tests/support/comfyui_locate.py) || { echo "prepare: no ComfyUI checkout: $comfy" >&2; return 1; }
  exclude ComfyUI
  rm -rf ComfyUI && mkdir ComfyUI
  if git -C "$comfy" rev-parse --git-dir >/dev/null 2>&1; then
    # the tracked files (a sparse checkout's absent ones skipped), not .git or what runs left there
    git -C "$comfy" ls-files -z | tar -C "$comfy" --null -T - --ignore-failed-read -cf - 2>/dev/null \
      | tar -C ComfyUI -xf -
  else
    tar -C "$comfy" --exclude=.git --exclude=__pycache__ -cf - . | tar -C ComfyUI -xf -
  fi
  du -sh .whl ComfyUI
  echo "carry: .whl ComfyUI"
}

setup_there() {  # the carried wheels, and a stand-in for PyAV (ComfyUI imports it for its video types only)
  local wheels=(.whl/*.whl) p n
  if [ -n "${SMOKE:-}" ]; then  # this machine's Python has ComfyUI's; a wheel's file name has _ for -
    wheels=()
    for p in "${SPARSIFY_WHEELS[@]}"; do n=${p%%==*}; wheels+=(.whl/"${n//-/_}"-*.whl); done
  fi
  if [ -e "${wheels[0]}" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      "${wheels[@]}" || return 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  if ! python3 -c "import av" 2>/dev/null; then
    local stub=/tmp/av-stand-in/av
    mkdir -p "$stub/subtitles"
    for f in __init__ container subtitles/__init__ subtitles/stream; do
      echo 'def __getattr__(name): return type(name, (), {})' > "$stub/$f.py"
    done
    export PYTHONPATH=/tmp/av-stand-in:$PYTHONPATH
    echo "note: PyAV is absent; a stand-in module answers ComfyUI's video imports"
  fi
  export COMFYUI_PATH=${COMFYUI_PATH:-$ROOT/ComfyUI} PYTHONUNBUFFERED=1
}

part() {  # part NAME SECONDS COMMAND...: run with a limit, log to $LOGS/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit} s): $*"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - t0)) s"
  [ "$rc" -eq 0 ] || failed+=("$name")
}

run() {
  LOGS=${OUT:-$ROOT/out/gpu_checks}
  mkdir -p "$LOGS"
  setup_there || { echo "run: the carried wheels could not be installed" >&2; return 1; }
  local device=cuda tokens=${TOKENS:-8388608} training=() sampling=(--reps "${REPS:-10}")
  if [ -n "${SMOKE:-}" ]; then
    device=cpu tokens=16384 training=(--against sparsify --eval-tokens 8192) sampling=(--smoke --reps 1 --groups sdxl1)
    echo "SMOKE: on the CPU at tiny sizes, to check this script; the figures mean nothing"
  else
    python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; \
print('torch', torch.__version__, torch.version.cuda, torch.cuda.get_device_name())" || return 1
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
  fi
  failed=()
  local parts=("$@")
  [ ${#parts[@]} -gt 0 ] || parts=(tests training sampling)
  for p in "${parts[@]}"; do
    case $p in
      tests) part tests "${TESTS_S:-240}" python3 -m pytest -q -p no:cacheprovider tests/unit/test_training_cuda.py ;;
      training)
        part training-fp32 "${TRAINING_S:-240}" python3 benches/bench_training.py --device "$device" \
          --tokens "$tokens" --rounds 2 "${training[@]}"
        part training-tf32 "${TRAINING_S:-240}" python3 benches/bench_training.py --device "$device" \
          --tokens "$tokens" --rounds 1 --matmul tf32 "${training[@]}" ;;
      sampling) part sampling "${SAMPLING_S:-300}" python3 benches/bench_gpu.py "${sampling[@]}" ;;
      *) echo "run: unknown part $p (tests, training, sampling)" >&2; return 2 ;;
    esac
  done
  if [ ${#failed[@]} -gt 0 ]; then
    echo "failed: ${failed[*]}"
    return 1
  fi
  echo "all parts passed: ${parts[*]}"
}

case ${1:-} in
  prepare) prepare ;;
  run) shift; run "$@" ;;
  *) sed -n '2,14p' "$0" >&2; exit 2 ;;
esac
