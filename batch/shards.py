"""Which shard of the plan this process runs: --shard I/N, or SLURM's environment."""

from __future__ import annotations

import os

from batch.errors import JobError


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise JobError(f"--shard {text!r}: expected I/N, e.g. 0/4") from None
    if not (n >= 1 and 0 <= i < n):
        raise JobError(f"--shard {text!r}: need 0 <= I < N")
    return i, n


def slurm_shard(env: dict[str, str] | None = None) -> tuple[int, int]:
    """(shard, shards) from a SLURM job array and the task rank within the job; (0, 1) outside SLURM.

    Array task k of K with T tasks per job (one per GPU, from srun) runs shard k*T + rank of K*T.
    """
    env = os.environ if env is None else env
    tasks = int(env.get("SLURM_NTASKS", "1") or 1)
    rank = int(env.get("SLURM_PROCID", "0") or 0)
    if "SLURM_ARRAY_TASK_ID" in env:
        task = int(env["SLURM_ARRAY_TASK_ID"])
        low = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        if "SLURM_ARRAY_TASK_COUNT" in env:
            count = int(env["SLURM_ARRAY_TASK_COUNT"])
        else:
            count = int(env.get("SLURM_ARRAY_TASK_MAX", task)) - low + 1
        task -= low
    else:
        task, count = 0, 1
    return task * tasks + rank, count * tasks
