#!/usr/bin/env bash
# Submit a komt-batch run to SLURM: an N-task array (one shard per task)
# plus a merge job that runs only when every shard succeeded.
#
#   slurm/submit.sh JOB.yaml N [extra sbatch options...]
#
# Extra sbatch options go to both the array and the merge (e.g.
# --partition=gpu --account=proj --time=8:00:00).
# Output: "array job: <id>", "merge job: <id>", and the merge job id alone as
# the last line, so scripts can do: merge=$(slurm/submit.sh j.yaml 8 | tail -n1)
#
# Environment knobs:
#   GPUS_PER_TASK      GPUs per array task (default 1; 0 = no --gres)
#   PROCS_PER_TASK     processes per array task, one per GPU (default 1); with P > 1 each
#                      array task asks for P tasks of one GPU each and starts them with srun:
#                      N array tasks x P processes = N*P shards
#   KOMT_BATCH         CLI command (default komt-batch), e.g.
#                      "$PWD/.venv/bin/python -m batch"
#   KOMT_ARGS          key=value overrides for run and merge (whitespace-split)
#   KOMT_DATE          YYYY-MM-DD for {date}  (default: now, computed here once
#   KOMT_TIME          HHMMSS for {time}       for all tasks, requeues and the merge)
#   KOMT_RUN_ID        reuse an older run key for {job_id} (default: the array id)
#   KOMT_MAX_REQUEUES  per-task requeue cap (default 20)
#   KOMT_ARRAY_LIMIT   at most this many tasks at once (--array=0-(N-1)%LIMIT)
#   KOMT_PLAN          1 (default): plan once here, before any task starts (the array is
#                      submitted held, `komt-batch plan` runs here -- tokenizer and input, no
#                      GPU -- then the array is released; a plan that fails cancels both jobs
#                      before any GPU is allocated). 0: the first shard plans, the others wait.
#
# Relative paths (logs/, the job file, paths inside it) resolve against the
# current directory: SLURM starts the jobs there (sbatch's default --chdir).
set -euo pipefail

usage() { echo "usage: $0 JOB.yaml N [extra sbatch options...]   ($0 --help: the environment knobs)" >&2; exit 2; }
if [[ ${1:-} == -h || ${1:-} == --help ]]; then  # this file's header, the usage and the knobs
    sed -n '2,/^$/s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; exit 0
fi
(($# >= 2)) || usage
job_file=$1
n=$2
shift 2
[[ $n =~ ^[1-9][0-9]*$ ]] || { echo "N must be a positive integer, got '$n'" >&2; exit 2; }
[[ -f $job_file ]] || { echo "job file not found: $job_file" >&2; exit 2; }

# The .sbatch files live next to this script, wherever it is called from.
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

gpus=${GPUS_PER_TASK:-1}
[[ $gpus =~ ^[0-9]+$ ]] || { echo "GPUS_PER_TASK must be a number, got '$gpus'" >&2; exit 2; }
gres=()
((gpus > 0)) && gres=(--gres="gpu:$gpus")
procs=${PROCS_PER_TASK:-1}
[[ $procs =~ ^[1-9][0-9]*$ ]] || { echo "PROCS_PER_TASK must be a positive integer, got '$procs'" >&2; exit 2; }
if ((procs > 1)); then
    # one process per GPU on a multi-GPU node: the sbatch script starts them with srun
    gres=(--ntasks="$procs")
    ((gpus > 0)) && gres+=(--gpus-per-task=1)
fi

array_range="0-$((n - 1))"
if [[ -n ${KOMT_ARRAY_LIMIT:-} ]]; then
    [[ $KOMT_ARRAY_LIMIT =~ ^[1-9][0-9]*$ ]] || { echo "KOMT_ARRAY_LIMIT must be a positive integer, got '$KOMT_ARRAY_LIMIT'" >&2; exit 2; }
    array_range+="%$KOMT_ARRAY_LIMIT"
fi

# Passed through the environment, not --export=ALL,KOMT_JOB=...: that form
# splits on commas, so a path or an override with a comma would break it.
# --export=ALL (explicit, in case the site sets SBATCH_EXPORT=NONE) then
# hands them to the jobs.
export KOMT_JOB
KOMT_JOB=$(realpath "$job_file")
# One {date} and {time} for all tasks, requeues and the merge, even when a
# task starts or is requeued after midnight. One `date` call, so the two
# cannot straddle midnight either.
read -r now_date now_time < <(date '+%F %H%M%S')
export KOMT_DATE=${KOMT_DATE:-$now_date}
export KOMT_TIME=${KOMT_TIME:-$now_time}
export KOMT_BATCH=${KOMT_BATCH:-komt-batch}
export KOMT_ARGS=${KOMT_ARGS:-}
export KOMT_MAX_REQUEUES=${KOMT_MAX_REQUEUES:-20}
[[ $KOMT_MAX_REQUEUES =~ ^[0-9]+$ ]] || { echo "KOMT_MAX_REQUEUES must be a whole number, got '$KOMT_MAX_REQUEUES'" >&2; exit 2; }
command -v sbatch >/dev/null || { echo "sbatch not found: run this where SLURM's commands are (a login node), or put them on PATH" >&2; exit 2; }
unset KOMT_SHARDS  # (for reruns of single shards by hand: the array's tasks take their shards from the array)

# The jobs open logs/... before running a single line of the script; a
# missing directory makes them fail with no log at all.
mkdir -p logs

plan_first=${KOMT_PLAN:-1}
[[ $plan_first == [01] ]] || { echo "KOMT_PLAN must be 0 or 1, got '$plan_first'" >&2; exit 2; }
hold=()
((plan_first)) && hold=(--hold)

array_id=$(sbatch --parsable --export=ALL --array="$array_range" "${hold[@]}" "${gres[@]}" "$@" \
    "$here/komt-array.sbatch")
array_id=${array_id%%;*}   # --parsable prints "id" or "id;cluster"
echo "array job: $array_id"

# The merge needs the array's run key; a resumed run keeps the old one.
if ! merge_id=$(KOMT_RUN_ID=${KOMT_RUN_ID:-$array_id} KOMT_SHARDS=$((n * procs)) \
    sbatch --parsable --export=ALL --dependency="afterok:$array_id" \
        --kill-on-invalid-dep=yes "$@" "$here/komt-merge.sbatch"); then
    echo "merge submission failed; array job $array_id is queued without a merge" \
        "(scancel $array_id, or submit slurm/komt-merge.sbatch by hand)" >&2
    exit 1
fi
merge_id=${merge_id%%;*}
echo "merge job: $merge_id"

if ((plan_first)); then
    read -ra cli <<<"$KOMT_BATCH"
    read -ra overrides <<<"$KOMT_ARGS"
    if ! "${cli[@]}" plan --run-id "${KOMT_RUN_ID:-$array_id}" --date "$KOMT_DATE" --time "$KOMT_TIME" \
        "$KOMT_JOB" "${overrides[@]}" >&2; then
        scancel "$array_id" "$merge_id"
        echo "planning failed (above); array job $array_id and merge job $merge_id are cancelled" >&2
        exit 1
    fi
    scontrol release "$array_id"
fi
echo "$merge_id"
