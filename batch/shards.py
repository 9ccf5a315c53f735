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

    def number(name: str, default: int) -> int:
        value = env.get(name, "") or str(default)
        if not value.strip().isdigit():
            raise JobError(f"{name}={value!r}: expected a number (the SLURM environment); or give --shard I/N")
        return int(value)

    tasks, rank = number("SLURM_NTASKS", 1), number("SLURM_PROCID", 0)
    if "SLURM_ARRAY_TASK_ID" in env:
        task = number("SLURM_ARRAY_TASK_ID", 0)
        low = number("SLURM_ARRAY_TASK_MIN", 0)
        if "SLURM_ARRAY_TASK_COUNT" in env:
            count = number("SLURM_ARRAY_TASK_COUNT", 1)
        else:
            count = number("SLURM_ARRAY_TASK_MAX", task) - low + 1
        task -= low
    else:
        task, count = 0, 1
    if not (tasks >= 1 and count >= 1 and 0 <= task < count and 0 <= rank < tasks):
        raise JobError(f"the SLURM environment gives shard {task * tasks + rank} of {count * tasks}, which does not exist; or give --shard I/N")
    return task * tasks + rank, count * tasks
