#!/usr/bin/env bash
# The GPU check of `komt-batch bench`, as one prepared script, at most 8 minutes on the GPU machine
# with the model's build: run from the repo root there, with $OUT set (the folder whose files come
# back). Nothing is downloaded: wheels carried in .whl/ (bitsandbytes 0.50.2, transformers 5.24.0,
# peft 0.21.2, as on the CPU machines) are installed into /tmp/site; the model is a 7B-shaped random
# Llama built on the GPU (jobs/bench-gpu.yaml: 1,024 prompts, modes 1-6, each stopped after
# mode_budget seconds). Writes $OUT/bench-gpu.log (everything), $OUT/bench-gpu.txt (the table),
# $OUT/bench-gpu.json (all figures; rewritten after every mode, so a stopped run keeps its modes),
# then, if time is left, $OUT/profile.txt (tools/gpu_profile.py) and the greedy agreement of
# tools/agreement.py in bf16 on the tiny model.
#
#   fetch the wheels here (see the device README):  pip download --no-deps --only-binary=:all: ... -d .whl NAME==VERSION
#   run there:  bash tools/gpu_bench.sh [KEY=VALUE overrides of jobs/bench-gpu.yaml]      (carry: .whl)
set -euo pipefail
OUT=${OUT:-out}
BENCH_SECONDS=${BENCH_SECONDS:-400}  # the bench's share of the 8 minutes: build, load, six modes of <= 60 s (most far less)
mkdir -p "$OUT"
exec > >(tee "$OUT/bench-gpu.log") 2>&1
tee_pid=$!
finish() { exec >&- 2>&-; wait "$tee_pid" 2>/dev/null || true; }  # the log's last lines reach $OUT
trap finish EXIT

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  echo "gpu_bench: no wheels in .whl/: using the machine's own packages"
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

nvidia-smi || echo "gpu_bench: nvidia-smi failed"
python3 - <<'PY'
import importlib
for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "safetensors", "tokenizers", "yaml", "numpy"):
    try:
        print(f"{name} {getattr(importlib.import_module(name), '__version__', '?')}")
    except Exception as e:  # say what is missing before the bench fails on it
        print(f"{name} MISSING: {type(e).__name__}: {e}")
import torch
print("cuda", torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name(0))
PY

status=0
timeout --signal=TERM --kill-after=30 "$BENCH_SECONDS" \
  python3 -m batch bench jobs/bench-gpu.yaml "output=$OUT/bench-gpu.json" "$@" | tee "$OUT/bench-gpu.txt" || status=$?
if [ "$status" -ne 0 ] && [ -f "$OUT/bench-gpu.json" ]; then
  echo "gpu_bench: the bench stopped early (exit $status); the modes it finished:"
  python3 -m batch.bench "$OUT/bench-gpu.json" | tee "$OUT/bench-gpu.txt"
fi

# Where the time goes: a short eager stream of the bench model under torch.profiler (kernels, and the
# engine's prefill / decode regions), if time is left.
# Then the decode step's attention, A/B: each row's own keys from extents (the default), from slots, and sdpa's mask.
if [ "${PROFILE:-1}" = 1 ] && [ "$SECONDS" -lt 430 ] && [ -d /tmp/komt-bench-7b/base ]; then  # (PROFILE=0: skipped)
  timeout 110 python3 tools/gpu_profile.py --prefill-rate --prompts 128 --max-new 16 --attention-ab 128 --ab-max-new 32 > "$OUT/profile.txt" 2>&1 \
    && head -n 5 "$OUT/profile.txt" || echo "gpu_bench: profile failed or ran out of time (see profile.txt)"
  grep "attention A/B\|decode attention\|prefill: " "$OUT/profile.txt" || true
fi

# Greedy agreement, batched vs alone, on the tiny trained model in bf16 (random 7B weights are full of
# near-ties): NF4 resident, dequantized, and dequantized with the adapter merged (also against the
# unmerged adapter's answers). Only in what is left of the 8 minutes (a cold process each: imports,
# CUDA start-up, loading; --merge loads twice).
for weights in "--weights dequantized" "--weights dequantized --merge" "--weights nf4"; do
  if [ "${AGREEMENT:-1}" = 1 ] && [ "$SECONDS" -lt 470 ]; then  # (AGREEMENT=0: skipped, e.g. by tools/gpu_session.sh)
    timeout $([[ $weights == *merge* ]] && echo 60 || echo 40) python3 tools/agreement.py --device cuda --dtype bfloat16 $weights \
      | tee -a "$OUT/bench-gpu.txt" || echo "gpu_bench: agreement ($weights) failed or ran out of time"
  fi
done
exit "$status"
