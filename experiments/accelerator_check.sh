#!/usr/bin/env bash
# One-run check of dmf_jax on an attached NVIDIA GPU (issue 27), within about 10 minutes:
#
#   experiments/accelerator_check.sh OUT_DIR
#
# 1. a virtualenv with the locked jax and its CUDA plugin (the aot-gpu extra; DMF_CHECK_VENV,
#    default /tmp/dmf_accelerator_venv; an existing one is reused, nothing is downloaded again);
# 2. the device-relevant tests (the layers, mixed precision, the models' forward, serving) on
#    the GPU;
# 3. benchmark_train (din, dmf; batch 512 and 4096), benchmark_serving (N = 1200, L = 200),
#    benchmark_scale's catalog rows (1,000 and 1,000,000 items) and the AOT report
#    for the local GPU (`--targets=local`: compiled on the device, with autotuning).
# Every JSON and log lands in OUT_DIR (a new or empty folder: an earlier check's is refused);
# summary.txt says what passed. Each part has its own time
# limit, so one slow part cannot starve the others. DMF_CHECK_ALLOW_CPU=1 runs the same steps
# on the CPU (a dry run of the script; the figures are CPU figures).
set -uo pipefail
out=${1:?usage: experiments/accelerator_check.sh OUT_DIR}
cd "$(dirname "$0")/.."
if [ -e "$out" ] && [ -n "$(ls -A "$out" 2>/dev/null)" ]; then
  echo "accelerator_check: $out is not empty (an earlier check?); give a new folder" >&2
  exit 2
fi
mkdir -p "$out"
out=$(cd "$out" && pwd)
summary="$out/summary.txt"
: > "$summary"
note() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$summary"; }

# Run a named part with a time limit; its output goes to OUT_DIR/<name>.log.
part() {
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  note "$name: rc=$rc in $((SECONDS - start)) s (log: $name.log)"
  return $rc
}

if [ "${DMF_CHECK_ALLOW_CPU:-0}" = 1 ]; then
  platforms=cpu
else
  if ! nvidia-smi > "$out/nvidia-smi.txt" 2>&1; then
    echo "accelerator_check: no NVIDIA GPU here (nvidia-smi failed; see $out/nvidia-smi.txt)" >&2
    exit 2
  fi
  platforms=cuda,cpu
fi

venv=${DMF_CHECK_VENV:-/tmp/dmf_accelerator_venv}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv" || { note "venv: could not create $venv"; exit 2; }
fi
extras=test
[ "$platforms" = cpu ] || extras=test,aot-gpu  # the CUDA plugin of the locked jax version
part install 300 "$venv/bin/python" -m pip install --quiet -e ".[$extras]" -c requirements.lock \
    || exit 2
py="$venv/bin/python"

export JAX_PLATFORMS=$platforms XLA_PYTHON_CLIENT_PREALLOCATE=false
part devices 60 "$py" -c 'import jax; print(jax.devices()); print(jax.devices()[0].device_kind)'

# The tests' conftest adds 8 fake CPU devices; with JAX_PLATFORMS=cuda,cpu the default device
# is the GPU (shared by the 4 workers: no preallocation).
part tests 180 "$py" -m pytest -q -n 4 tests/nn tests/models/test_precision.py \
    tests/models/test_forward.py tests/serve/test_server.py

data="$out/data"
for batch in 512 4096; do
  part "train_$batch" 120 "$py" -m experiments.benchmark_train \
      --config=experiments/configs/synthetic.py --config.data_dir="$data" --models=din,dmf \
      --batch_size="$batch" --steps=30 --end_to_end_models= \
      --output_json="$out/benchmark_train_$batch.json"
done
part serving 90 "$py" -m experiments.benchmark_serving --candidates=1200 --seq_len=200 \
    --scopes=attention,model --output_json="$out/benchmark_serving.json"
part scale 150 "$py" -m experiments.benchmark_scale --data_dir="$data" --build_config= \
    --num_items=1000,1000000 --long_seq_items=0 --steps=10 --sparse_min_rows=100000 \
    --output_json="$out/benchmark_scale.json"
if [ "$platforms" != cpu ]; then
  part aot 150 "$py" -m experiments.aot_report --targets=local --models=din,dmf \
      --num_items=1682,1000000 --output_json="$out/aot_local.json"
fi
note "done: $(grep -c 'rc=0' "$summary") parts passed of $(grep -c 'rc=' "$summary")"
