#!/usr/bin/env bash
# A GPU session's checks in one device call (the machine is handed back after a short idle, and
# each start costs minutes): tools/gpu_bench.sh (at most 8 minutes), then, in what is left of
# LIMIT seconds, the bf16 resume check and the GPU tests. Everything lands under $OUT.
#   run there:  bash tools/gpu_session.sh        (carry: .whl; timeout_s 600: one try, no rerun)
#               WORKLOAD=annotation bash tools/gpu_session.sh    (the shared-prefix workload, issue 25)
set -uo pipefail
OUT=${OUT:-out}
LIMIT=${LIMIT:-590}
mkdir -p "$OUT"
# WORKLOAD=annotation: jobs/bench-annotation.yaml's workload (a shared 400-token instruction, items of
# median 60 tokens, 32 new) on the 7B-shaped model instead, shared prefixes on (mode 4) against off (mode 7)
if [ "${WORKLOAD:-}" = annotation ]; then
  set -- prompts=512 shared_instruction=400 prompt_median=60 prompt_sigma=0.6 prompt_max=600 max_new_tokens=32 \
    "modes=[dequantized, unshared]" model.dir=/tmp/komt-bench-7b-annotation "$@"
fi
AGREEMENT=0 bash tools/gpu_bench.sh "$@"  # (the tiny model's bf16 agreement was measured on 2026-11-28)
echo "gpu_session: bench done at ${SECONDS}s (exit $?)"
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
[ -d /tmp/site ] || export PYTHONPATH=$PWD
if [ "$SECONDS" -lt $((LIMIT - 90)) ]; then
  timeout $((LIMIT - 25 - SECONDS)) bash tools/gpu_resume_check.sh > "$OUT/resume-check.txt" 2>&1
  echo "gpu_session: resume check exit $? at ${SECONDS}s"; grep "resume check" "$OUT/resume-check.txt"
fi
if [ "$SECONDS" -lt $((LIMIT - 20)) ]; then
  timeout $((LIMIT - SECONDS)) python3 -m pytest -q -p no:cacheprovider tests/test_decode_attention.py tests/test_decode_step.py -k gpu > "$OUT/pytest-gpu.txt" 2>&1
  echo "gpu_session: GPU tests exit $? at ${SECONDS}s"; tail -n 2 "$OUT/pytest-gpu.txt"
fi
