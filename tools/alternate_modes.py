"""Two or more bench modes side by side, each in a process of its own, their order alternated round by round.

    python tools/alternate_modes.py jobs/bench.yaml engine unshared [--rounds 2] [-- OVERRIDE ...]

Round 1 runs the modes in the order given, round 2 in the reverse order, and so on (A B, B A, A B
...), each as `komt-batch bench FILE "modes=[MODE]" quiet_wait=0 output=out/alternate/ROUND-MODE.json
OVERRIDES...`, so that neither the order within a process (the bench runs its modes in a fixed order)
nor a drift of the machine over the run favours one mode. Prints every run's generated tok/s, each
mode's best and median, and the ratio of the first mode's best to each other mode's best (the
figure of issue 25's "no regression" target: sharing on against off). The bench model is built by
the first run (if missing) and reused. Run it on an otherwise quiet machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_mode(bench: str, mode: str, output: Path, overrides: list[str]) -> dict[str, float]:
    """One bench process of one mode: {variant: generated tok/s}."""
    cmd = [str(Path(sys.executable).with_name("komt-batch")), "bench", bench, f"modes=[{mode}]", "quiet_wait=0", f"output={output}", *overrides]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    report = json.loads(output.read_text())
    return {v["variant"]: m["tokens_per_second"] for v in report["variants"] for m in v["modes"].values() if "tokens_per_second" in m}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bench", help="the bench file, e.g. jobs/bench.yaml")
    ap.add_argument("modes", nargs="+", help="bench modes by name (batch/bench/settings.py), e.g. engine unshared")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="out/alternate", help="folder for each run's bench report")
    args, overrides = ap.parse_known_args()
    overrides = [o for o in overrides if o != "--"]
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[tuple[str, str], list[float]] = {}
    t0 = time.time()
    for r in range(args.rounds):
        for mode in args.modes if r % 2 == 0 else args.modes[::-1]:
            for variant, tps in run_mode(args.bench, mode, out / f"{r + 1}-{mode}.json", overrides).items():
                runs.setdefault((variant, mode), []).append(tps)
                print(f"round {r + 1}: {variant}: {mode}: {tps:.1f} tok/s", flush=True)
    print(f"\n| variant | mode | runs (tok/s, in run order) | best | median | {args.modes[0]}'s best / this best |")
    print("| --- | --- | --- | ---: | ---: | ---: |")
    for (variant, mode), values in runs.items():
        first = max(runs[(variant, args.modes[0])])
        ratio = "-" if mode == args.modes[0] else f"{first / max(values):.3f}x ({args.modes[0]} / {mode})"
        print(f"| {variant} | {mode} | {', '.join(f'{v:.1f}' for v in values)} | {max(values):.1f} | {statistics.median(values):.1f} | {ratio} |")
    print(f"\n{args.rounds} rounds, {time.time() - t0:.0f} s in all; bench reports in {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
