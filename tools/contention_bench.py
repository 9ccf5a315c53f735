"""The job's CPU threads under contention: komt-batch runs of one job, side by side in one run.

    python tools/contention_bench.py [--model bench|tiny|DIR] [--prompts 64] [--max-new-tokens 48]
                                     [--rounds 2] [--busy-share 1.0] [--json out/contention.json]

Four ways of running the same float32 + LoRA job (greedy), each a real `komt-batch run` process:
  job        the job's own choice (batch/threads.py: one thread per usable CPU, OpenMP's default
             waiting, fewer threads while other processes use the CPUs)
  passive    cpu.wait_policy=passive: one thread per usable CPU, fixed, idle threads sleeping (the
             job's choice before the threads adapted)
  one thread cpu.threads=1
  default    PyTorch's default: torch loaded before komt-batch runs, so neither is touched (one
             thread per core, OpenMP's default spinning wait, fixed)
on a quiet machine and with one busy process beside it (a Python loop this script starts and stops;
--busy-share below 1 makes it busy that share of the time, to find where the threads should drop).
The variants alternate within each condition, the conditions alternate within each round, and each
figure is the best of the rounds (generated tok/s as the job's summary reports it: completion tokens
over generation seconds, model loading excluded; with how often the job lowered its threads, the
summary's cpu_threads_lowered). It prints the table and the targets of issue 21: busy, job >= 0.8x
one thread; quiet, job >= 0.95x default.

--model bench (the default) builds the benchmark's random Llama with 4 layers once (hidden 512,
float32, a random LoRA adapter; out/contention-model, minutes on 2 cores) and reuses it; tiny is the
test fixture models/tiny-komt (2 layers, hidden 128); DIR is any directory with base/ and adapter/.
Run it on an otherwise quiet machine: other processes make the "quiet" figures meaningless.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = {
    "job": ([], []),
    "passive": ([], ["cpu.wait_policy=passive"]),
    "one thread": ([], ["cpu.threads=1"]),
    # torch imported before komt-batch's CLI: its threads and OpenMP's wait policy stay PyTorch's defaults
    "default": (["-c", "import sys, torch; from batch.cli import main; sys.exit(main())"], []),
}
CONDITIONS = ("quiet", "busy")


def bench_model(prompts: int, max_new: int) -> tuple[Path, Path, list[str]]:
    """The benchmark's model with 4 layers (built once into out/contention-model) and PROMPTS prompts."""
    from transformers import AutoTokenizer

    import batch.loading  # noqa: F401  (its log filters, before bitsandbytes is imported)
    from batch.bench.model import ensure_model
    from batch.bench.prompts import make_prompts
    from batch.bench.settings import load_bench

    cfg = load_bench(None, [f"prompts={prompts}", f"max_new_tokens={max_new}", "model.dir=out/contention-model",
                            "model.num_layers=4", "model.tune_prompts=32", "prompt_median=60", "prompt_max=400"])
    meta = ensure_model(cfg, AutoTokenizer.from_pretrained(cfg.model.tokenizer))
    tokenizer = AutoTokenizer.from_pretrained(meta["base"])
    return Path(meta["base"]), Path(meta["adapter"]), make_prompts(cfg, tokenizer, prompts, cfg.seed)


def fixture_prompts(n: int) -> list[str]:
    seeds = [json.loads(line)["instruction"] for line in (ROOT / "data" / "seed_examples.jsonl").read_text(encoding="utf-8").splitlines()]
    return [f"### instruction: {seeds[i % len(seeds)]}{' 자세히' * (i % 5)}\n\n### Response:" for i in range(n)]


def write_job(work: Path, base: Path, adapter: Path, prompts: list[str], max_new: int) -> Path:
    src = work / "prompts.jsonl"
    src.write_text("".join(json.dumps({"id": f"p{i:04d}", "text": p}, ensure_ascii=False) + "\n" for i, p in enumerate(prompts)), encoding="utf-8")
    job = {
        "model": {"base": str(base), "adapter": str(adapter), "quantization": "none", "compute_dtype": "float32", "device_map": "cpu"},
        "input": {"path": str(src), "id_column": "id"},
        "prompt": {"template": "{text}"},
        "generation": {"max_new_tokens": max_new, "do_sample": False},
        "batching": {"max_batch_size": 32, "max_batch_tokens": 65536},
        "output": {"path": str(work / "out" / "result.parquet")},
        "checkpoint": {"every_rows": 100000, "every_seconds": 3600},
    }
    path = work / "job.json"  # JSON is YAML
    path.write_text(json.dumps(job, ensure_ascii=False))
    return path


def run_once(job: Path, variant: str) -> dict:
    python_args, overrides = VARIANTS[variant]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    argv = [sys.executable, *(python_args or ["-m", "batch"]), "run", str(job), "--no-progress", "--restart", *overrides]
    p = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"contention_bench: {variant} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    summary = dict(re.findall(r"^(\w+)\s+(\S+)$", p.stdout, re.M))
    cpu = next((line.removeprefix("komt-batch: cpu: ") for line in p.stderr.splitlines() if line.startswith("komt-batch: cpu: ")), "")
    return {"tok_s": float(summary["tokens_per_second"]), "tokens": int(summary["completion_tokens"]),
            "seconds": float(summary["generate_seconds"]), "cpu": cpu, "lowered": int(summary["cpu_threads_lowered"])}


def start_busy(share: float) -> subprocess.Popen:
    """A process that keeps SHARE of one core busy: all of it, or busy for that share of every 100 ms."""
    if share >= 1:
        return subprocess.Popen([sys.executable, "-c", "while True: pass"])
    loop = f"""import time
while True:
    t = time.monotonic()
    while time.monotonic() - t < {share} * 0.1:
        pass
    time.sleep({1 - share} * 0.1)
"""
    return subprocess.Popen([sys.executable, "-c", loop])


def stop_busy(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="bench", help="bench (4-layer benchmark model, built once), tiny (models/tiny-komt), or a DIR with base/ and adapter/")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=2, help="runs of every variant in every condition; the best counts")
    ap.add_argument("--busy-share", type=float, default=1.0,
                    help="the share of one core the busy process takes (1: all; 0.5: busy 50 ms of every 100): where one "
                         "thread starts to beat the default's two is where batch/threads.py's BUSY_CORES belongs")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()

    t0 = time.time()
    if args.model == "bench":
        base, adapter, prompts = bench_model(args.prompts, args.max_new_tokens)
    else:
        d = ROOT / "models" / "tiny-komt" if args.model == "tiny" else Path(args.model)
        base, adapter, prompts = d / "base", d / "adapter", fixture_prompts(args.prompts)
    load_before = os.getloadavg()
    runs: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="contention-") as tmp:
        job = write_job(Path(tmp), base, adapter, prompts, args.max_new_tokens)
        names = list(VARIANTS)
        for r in range(args.rounds):
            for condition in CONDITIONS if r % 2 == 0 else CONDITIONS[::-1]:
                busy = start_busy(args.busy_share) if condition == "busy" else None
                try:
                    for variant in names[r % len(names):] + names[: r % len(names)]:  # a rotated order each round
                        res = runs.setdefault((condition, variant), [])
                        res.append(run_once(job, variant))
                        print(f"round {r + 1} {condition:5} {variant:10} {res[-1]['tok_s']:9.1f} tok/s, threads lowered {res[-1]['lowered']}x"
                              f"  ({res[-1]['cpu']})", file=sys.stderr, flush=True)
                finally:
                    if busy:
                        stop_busy(busy)
    best = {k: max(v, key=lambda x: x["tok_s"]) for k, v in runs.items()}

    def ratio(a, b):
        return best[a]["tok_s"] / best[b]["tok_s"]

    targets = {
        "busy: job / one thread (>= 0.8)": ratio(("busy", "job"), ("busy", "one thread")),
        "quiet: job / default (>= 0.95)": ratio(("quiet", "job"), ("quiet", "default")),
        "busy: default / one thread (report)": ratio(("busy", "default"), ("busy", "one thread")),
        "busy: job / default (report)": ratio(("busy", "job"), ("busy", "default")),
        "busy: passive / one thread (report)": ratio(("busy", "passive"), ("busy", "one thread")),
        "quiet: passive / default (report)": ratio(("quiet", "passive"), ("quiet", "default")),
    }
    print(f"\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {_commit()}, {_cpu()}, {os.cpu_count()} CPUs, "
          f"load before {load_before[0]:.2f}; model {args.model} ({base}), {len(prompts)} prompts, {args.max_new_tokens} new tokens, "
          f"float32 + LoRA, greedy; busy process: {args.busy_share:g} of a core; best of {args.rounds}; {time.time() - t0:.0f} s in all")
    print(f"| condition | {' | '.join(VARIANTS)} |\n|---|{'---:|' * len(VARIANTS)}")
    for condition in CONDITIONS:
        cells = " | ".join(f"{best[(condition, v)]['tok_s']:,.1f}" for v in VARIANTS)
        print(f"| {condition} | {cells} |")
    print("the job lowered its threads (its best runs): " + ", ".join(f"{c} {best[(c, 'job')]['lowered']}x" for c in CONDITIONS))
    for name, value in targets.items():
        goal = re.search(r">= ([\d.]+)", name)
        verdict = "" if not goal else ("  met" if value >= float(goal.group(1)) else "  NOT met")
        print(f"{name}: {value:.2f}{verdict}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"runs": {f"{c}/{v}": r for (c, v), r in runs.items()}, "ratios": targets}, indent=2, ensure_ascii=False))
    return 0


def _commit() -> str:
    p = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return p.stdout.strip() or "?"


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "?"


if __name__ == "__main__":
    sys.exit(main())
