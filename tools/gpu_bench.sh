#!/usr/bin/env bash
# The GPU check of `komt-batch bench`, as one prepared script: run from the repo root on the GPU
# machine, with $OUT set (the folder whose files come back). Carried wheels in .whl/ (bitsandbytes
# 0.50.2, transformers 5.24.0) are installed into /tmp/site, nothing is downloaded; the model is a
# 7B-shaped random Llama built on the GPU (jobs/bench-gpu.yaml). Writes $OUT/bench-gpu.json and
# $OUT/bench-gpu.log.
set -euo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
{
  nvidia-smi
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
  python3 -m batch bench jobs/bench-gpu.yaml "output=$OUT/bench-gpu.json" "$@"
} 2>&1 | tee "$OUT/bench-gpu.log"
