#!/usr/bin/env bash
# A GPU session's checks in one device call (the machine is handed back after a short idle, and
# each start costs time): the steps named in STEPS, in order, each only while LIMIT seconds leave it
# room. Everything lands under $OUT.
#   run there:  bash tools/gpu_session.sh [KEY=VALUE overrides of jobs/bench-gpu.yaml for `bench`]   (carry: .whl; timeout_s 600)
#   STEPS (default "bench resume tests"):
#     bench       tools/gpu_bench.sh: jobs/bench-gpu.yaml (modes 1-6), then the profile in its time left -> bench-gpu.*, profile.txt
#     merged      the same workload, the adapter merged (model.merge_adapter), mode 4 -> merged.txt, merged.json
#     rates       prefill forwards of fixed shapes, then the engine's own (packed) prefill of 32k tokens in rows of 128 and
#                 512, adapter unmerged (RATES="unmerged merged": and merged), and where a padded prefill syncs the host
#                 (tools/gpu_profile.py --prefill-rate --engine-rate) -> rates.txt
#     annotation  jobs/bench-annotation.yaml's workload (a shared 400-token instruction, items of median 60, 32 new) on the
#                 7B-shaped model: shared prefixes on (mode 4) against off (mode 7) -> annotation.txt, annotation.json
#     readonce    after bench (its 7B-shaped model): 256 annotation-shaped prompts, decode steps replayed as graphs
#                 over extents, a shared prefix read once against every row's copy (tools/gpu_profile.py
#                 --read-once-ab) -> read-once.txt
#     resume      tools/gpu_resume_check.sh: bf16 resume and 2-shard agreement -> resume-check.txt
#     tests       the GPU tests -> pytest-gpu.txt
#   e.g. STEPS="tests bench merged readonce annotation" LIMIT=340 PROFILE=1 bash tools/gpu_session.sh "modes=[dequantized]"
set -uo pipefail
OUT=${OUT:-out}
LIMIT=${LIMIT:-590}
STEPS=${STEPS:-bench resume tests}
mkdir -p "$OUT"
left() { echo $((LIMIT - SECONDS)); }
install_wheels() {
  if compgen -G ".whl/*.whl" >/dev/null && [ ! -d /tmp/site ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  fi
  export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
  [ -d /tmp/site ] && export PYTHONPATH=/tmp/site:$PWD
}
bench() {  # bench NAME SECONDS OVERRIDES...: python -m batch bench jobs/bench-gpu.yaml -> $OUT/NAME.json, $OUT/NAME.txt
  local name=$1 seconds=$2 status=0; shift 2  # (at most 8 files come back: the log's tail goes into NAME.txt)
  timeout --signal=TERM --kill-after=20 "$seconds" python3 -m batch bench jobs/bench-gpu.yaml "output=$OUT/$name.json" "$@" > "/tmp/$name.log" 2>&1 || status=$?
  echo "gpu_session: $name exit $status at ${SECONDS}s"
  { [ -f "$OUT/$name.json" ] && python3 -m batch.bench "$OUT/$name.json"; echo "--- the log's last lines:"; tail -n 25 "/tmp/$name.log"; } > "$OUT/$name.txt"
  grep -E "tok/s|targets" "$OUT/$name.txt" | head -n 12
}
for step in $STEPS; do
  [ "$(left)" -gt 30 ] || { echo "gpu_session: no time left for $step"; continue; }
  case $step in
    bench)  # (the tiny model's bf16 agreement was measured on 2026-11-28)
      BENCH_SECONDS=$(( $(left) - 130 < 400 ? $(left) - 130 : 400 )) AGREEMENT=0 PROFILE=${PROFILE:-1} bash tools/gpu_bench.sh "$@"
      echo "gpu_session: bench exit $? at ${SECONDS}s"; install_wheels ;;
    merged)
      install_wheels; bench merged $(( $(left) < 150 ? $(left) - 5 : 150 )) "variants=[nf4+lora+merged]" "modes=[dequantized]" ;;
    rates)
      install_wheels
      for merge in ${RATES:-unmerged}; do  # (RATES="unmerged merged": both)
        [ "$merge" = merged ] && merge=--merge || merge='' 
        timeout 90 python3 tools/gpu_profile.py --prefill-rate --engine-rate --rate-only $merge >> "$OUT/rates.txt" 2>&1
        echo "gpu_session: rates $merge exit $? at ${SECONDS}s"
      done
      grep "prefill rate" "$OUT/rates.txt" ;;
    annotation)
      install_wheels
      bench annotation $(( $(left) - 5 )) prompts=512 shared_instruction=400 prompt_median=60 prompt_sigma=0.6 prompt_max=600 \
        max_new_tokens=32 "modes=[dequantized, unshared]" model.dir=/tmp/komt-bench-7b-annotation ;;
    readonce)
      install_wheels
      timeout $(( $(left) < 120 ? $(left) - 5 : 120 )) python3 tools/gpu_profile.py --read-once-ab 256 > "$OUT/read-once.txt" 2>&1
      echo "gpu_session: read-once A/B exit $? at ${SECONDS}s"; grep -E "read-once A/B|decode attention" "$OUT/read-once.txt" ;;
    resume)
      install_wheels
      timeout $(( $(left) - 25 )) bash tools/gpu_resume_check.sh > "$OUT/resume-check.txt" 2>&1
      echo "gpu_session: resume check exit $? at ${SECONDS}s"; grep "resume check" "$OUT/resume-check.txt" ;;
    tests)
      install_wheels
      timeout $(left) python3 -m pytest -q -p no:cacheprovider tests/test_decode_attention.py tests/test_decode_step.py tests/test_layers.py -k gpu > "$OUT/pytest-gpu.txt" 2>&1
      echo "gpu_session: GPU tests exit $? at ${SECONDS}s"; tail -n 2 "$OUT/pytest-gpu.txt" ;;
    *) echo "gpu_session: unknown step $step" ;;
  esac
done
