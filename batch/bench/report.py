"""The table and notes of a bench report (also of a partial one read back from its JSON)."""

from __future__ import annotations

from types import SimpleNamespace

from batch.bench.measuring import dist_line, quantiles
from batch.bench.settings import MODES

# --- the table -----------------------------------------------------------------------------------


def lengths_line(lengths: list[int]) -> str:
    return _q_line(quantiles(lengths))


def _q_line(q: dict) -> str:
    return f"min {q['min']}, p10 {q['p10']:.0f}, median {q['p50']:.0f}, mean {q['mean']:.0f}, p90 {q['p90']:.0f}, max {q['max']}"


def _mem(n: int | None) -> str:
    return "-" if not n else f"{n / 2**20:.0f} MiB" if n < 10 * 2**30 else f"{n / 2**30:.1f} GiB"


def _others(m: dict) -> str:
    share = (m.get("cpu") or {}).get("others_cpu_share")
    return "-" if share is None else f"{share:.0%}"


def _num(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _pct(v) -> str:
    return _num(v, ".1%")


def format_report(report: dict) -> str:
    """The table and notes, from a report as built or as read back from its JSON (also a partial one,
    written before the bench finished: `python -m batch.bench out/bench.json`)."""
    cfg = SimpleNamespace(**report["config"])
    mach = report["machine"]
    lines = [
        f"komt-batch bench  {report['date']}  commit {report.get('commit') or '?'}  {mach['cpu']}, {mach['usable_cores']} cores"
        + (f", {mach['gpu']}" if mach.get("gpu") else "") + f", torch {mach['torch']}, device {cfg.device}",
        f"model: random Llama {report['model']['dims']}, {report['model']['parameters'] / 1e6:.1f}M parameters; "
        f"{report['prompts']['count']} prompts ({report['prompts']['tokens']} tokens; {_q_line(report['prompts']['lengths'])}), "
        f"max_new_tokens {cfg.max_new_tokens}, stop {cfg.stop}; greedy except mode 5",
        "",
    ]
    header = ["variant", "mode", "weights", "rows", "tok/s", "in flight", "ms/step", "prefill", "prefill tok/s", "prefill eff", "prefilled", "decode eff",
              "overhead", "peak mem", "BW roof", "equal", "x single", "x fixed", "others"]
    table = [header]
    notes, busy, sampled = [], [], set()
    for r in report["variants"]:
        for name in MODES:
            m = r["modes"].get(name)
            if m is None:
                continue
            if "skipped" in m:
                table.append([r["variant"], m["label"], "-", "-", "skipped"] + [""] * (len(header) - 5))
                notes.append(f"{r['variant']} mode {m['mode']}: {m['skipped']}")
                continue
            rows = f"{m['rows']}" + ("*" if m.get("subsampled") else "")
            sampled |= {(name, m["rows"])} if m.get("subsampled") else set()
            equal = f"{m['equal_rows']}/{m['checked_rows']}" if "equal_rows" in m else "ref" if name == "single" else "-"
            table.append([
                r["variant"], m["label"], m.get("weights", "-"), rows, f"{m['tokens_per_second']:.1f}", _num(m.get("rows_in_flight"), ".1f"),
                _num(m.get("ms_per_decode_step"), ".1f"), _pct(m.get("prefill_share")), _num(m.get("prefill_tokens_per_second"), ",.0f"),
                _num(m["prefill_efficiency"], ".3f"), _pct(m.get("prefilled_share")), _num(m["decode_efficiency"], ".3f"),
                _pct(m["overhead"]), _mem(m["peak_memory_bytes"]), _pct(m.get("bandwidth_share")), equal,
                _num(m.get("vs_single"), ".2f"), _num(m.get("vs_fixed"), ".2f"), _others(m),
            ])
            if (m.get("cpu") or {}).get("others_cpu_share", 0) > 0.1:
                busy.append(f"{r['variant']} mode {m['mode']}")
            if m.get("note"):
                notes.append(f"{r['variant']} mode {m['mode']}: {m['note']}")
            if m.get("setup_seconds") is not None:
                notes.append(f"{r['variant']} mode {m['mode']}: its setup took {m['setup_seconds']:.1f}s more (not in tok/s)")
            if m.get("equal_rows_vs_fixed") is not None:
                notes.append(f"{r['variant']} {m['label']}: equal to mode 2 on {m['equal_rows_vs_fixed']}/{m['checked_rows_vs_fixed']} rows")
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    for j, row in enumerate(table):
        lines.append("  ".join(str(c).ljust(w) if i < 3 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    for name, rows in sorted(sampled, key=lambda s: MODES.index(s[0])):
        lines.append(f"* mode {MODES.index(name) + 1} timed on the first {rows} of {report['prompts']['count']} prompts "
                     f"({'single' if name == 'single' else 'fixed'}_limit; a rate); 'equal' compares the rows both modes ran")
    lines.append("in flight: rows per step on average; ms/step: per decode step; prefill: the share of the wall time in "
                 "prefill forwards; prefill tok/s: prompt tokens computed a second of them; BW roof: bytes a decode step must read / its time / the GPU's peak bandwidth")
    lines.append("prefilled: the share of the prompt tokens computed in prefills (the rest: shared prefixes' keys and values, "
                 "computed once and copied; komt-batch modes)")
    lines.append("others: the share of the machine's CPU that other processes used during the mode")
    if busy:
        lines.append(f"WARNING: other processes kept the CPU busy during {', '.join(busy)}: those figures are distorted; rerun on a quiet machine")
    lines += [f"note: {n}" for n in notes]
    lines.append("")
    for r in report["variants"]:
        d = r.get("completion_length_distribution")
        if d:
            lines.append(f"{r['variant']}: completion lengths (mode {d['mode']}): {dist_line(d, cfg.max_new_tokens)}; "
                         f"finish: eos {d.get('eos', 0)}, stop {d.get('stop', 0)}, length {d.get('length', 0)}")
        lines.append(f"{r['variant']}: targets: " + _targets_line(r.get("targets", {})))
    if report.get("targets"):
        lines.append("between variants: " + _targets_line(report["targets"]))
    lines.append(f"wall time {report['wall_seconds']:.0f}s" if report["complete"] else "INCOMPLETE: the bench stopped before its end")
    return "\n".join(lines)


def _targets_line(targets: dict) -> str:
    # (a target without a goal on this device, such as a GPU's on the CPU, is a figure: "report")
    return "; ".join(f"{name} [{_num(t['value'], '.3f')}] {'PASS' if t['pass'] else 'FAIL' if t['pass'] is False else 'report'}"
                     for name, t in targets.items()) or "-"
