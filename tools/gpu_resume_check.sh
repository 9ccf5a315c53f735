#!/usr/bin/env bash
# Does a resumed or sharded run write what an uninterrupted one writes, in bf16 on a GPU? The tiny
# komt model (NF4 dequantized to bf16 + LoRA, greedy, 64 new tokens) on 320 prompts, three ways:
# uninterrupted; killed (SIGKILL) after its first committed parts, then resumed; as 2 shards + merge.
# Prints how many rows' responses equal the uninterrupted run's. Run from the repo root on the GPU
# machine, after tools/gpu_bench.sh's installs (PYTHONPATH set) or with the machine's own packages.
#   bash tools/gpu_resume_check.sh            (writes under $OUT/resume)
set -euo pipefail
OUT=${OUT:-out}
DEVICE=${DEVICE:-cuda}  # (cpu: a check of this script)
W="$OUT/resume"
rm -rf "$W" && mkdir -p "$W"
python3 - "$W/in.jsonl" <<'PY'
import json, sys
from tests.test_exactness import prompts_40
with open(sys.argv[1], "w", encoding="utf-8") as f:
    for i in range(320):
        f.write(json.dumps({"id": f"r{i:03d}", "instruction": f"{i % 7}. {prompts_40()[i % 40]}"}, ensure_ascii=False) + "\n")
PY
job=(jobs/demo.yaml model.compute_dtype=bfloat16 model.device_map=$DEVICE model.weights=dequantized "input.path=$W/in.jsonl"
     generation.max_new_tokens=64 batching.max_batch_size=16 checkpoint.every_rows=16)
run() { python3 -m batch run "${job[@]}" --no-progress "$@"; }

run "output.path=$W/whole.parquet" 2> "$W/whole.log"

python3 -m batch run "${job[@]}" --no-progress "output.path=$W/resumed.parquet" 2> "$W/killed.log" &
pid=$!  # (python itself, not a subshell: SIGKILL must reach the process that holds the job)
until compgen -G "$W/resumed.parquet.parts/part-*.parquet" >/dev/null || ! kill -0 "$pid" 2>/dev/null; do sleep 0.2; done
kill -9 "$pid" 2>/dev/null || true
wait "$pid" 2>/dev/null || true
echo "resume: killed after $(ls "$W"/resumed.parquet.parts/part-*.parquet 2>/dev/null | wc -l) committed parts"
run "output.path=$W/resumed.parquet" 2> "$W/resumed.log"

run "output.path=$W/sharded.parquet" --shard 0/2 2> "$W/shard0.log" &
shard0=$!
run "output.path=$W/sharded.parquet" --shard 1/2 2> "$W/shard1.log"
wait "$shard0"  # (its exit status: a failed shard stops the check here)
python3 -m batch merge "${job[@]}" "output.path=$W/sharded.parquet" 2> "$W/merge.log"

python3 - "$W" "$DEVICE" <<'PY'
import sys
import pyarrow.parquet as pq
w = sys.argv[1]
whole = pq.read_table(f"{w}/whole.parquet").to_pylist()
for name in ("resumed", "sharded"):
    other = pq.read_table(f"{w}/{name}.parquet").to_pylist()
    assert [r["id"] for r in other] == [r["id"] for r in whole], name
    same = sum(a["response"] == b["response"] for a, b in zip(whole, other))
    print(f"resume check (bf16, {sys.argv[2]}): {name} vs uninterrupted: {same}/{len(whole)} rows with the same response")
PY
