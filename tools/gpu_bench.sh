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
  python3 -c 'import torch, transformers, peft, bitsandbytes; print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__, "peft", peft.__version__, "bitsandbytes", bitsandbytes.__version__)'
  python3 -m batch bench jobs/bench-gpu.yaml "output=$OUT/bench-gpu.json" "$@"
} 2>&1 | tee "$OUT/bench-gpu.log"
