"""The GPU session's tools, checked on the CPU so that a rare GPU call is not spent on a broken
script: the shell scripts parse, and tools/gpu_profile.py runs the GPU's paths (a cache of extents,
packed prefill, a shared prefix read once) with the reference kernel on the tiny model, printing
the lines the session reads."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT, TINY


def profile(*args: str) -> list[str]:
    done = subprocess.run([sys.executable, "tools/gpu_profile.py", "--device", "cpu", "--model", str(TINY), "--reference-kernel", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.splitlines()


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "tools").glob("*.sh")))
def test_the_gpu_scripts_parse(script):
    assert subprocess.run(["bash", "-n", f"tools/{script}"], cwd=ROOT).returncode == 0


def test_the_read_once_ab_reads_the_prefix_once_on_one_side_only():
    lines = [line for line in profile("--read-once-ab", "24") if line.startswith("read-once A/B")]
    reads = [re.search(r": (\d+) rows, (\d+) decode steps \((\d+) reading the prefix once", line).groups() for line in lines]
    assert [label in line for label, line in zip(("read once", "every copy"), lines)] == [True, True]
    (rows, steps, once), (rows_b, steps_b, once_b) = [tuple(map(int, r)) for r in reads]
    assert rows == rows_b == 24 and steps == steps_b > 0  # the same stream both times
    assert 0 < once <= steps and once_b == 0


def test_the_prefill_rate_times_the_engines_packed_prefill():
    lines = [line for line in profile("--engine-rate", "--rate-only") if line.startswith("prefill rate: engine")]
    assert [re.search(r"engine, (\d+) rows x (\d+):", line).groups() for line in lines] == [("256", "128"), ("64", "512")]
    for line in lines:
        forwards, positions = re.search(r"in its (\d+) forwards \(packed, ([\d,]+) positions each\)", line).groups()
        assert int(forwards) * int(positions.replace(",", "")) == 32768  # none padded, 4 forwards of 8,192
