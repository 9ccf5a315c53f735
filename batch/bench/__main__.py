"""python -m batch.bench REPORT.json: the table of a report's JSON, e.g. of a bench stopped before its end."""

import json
import sys
from pathlib import Path

from batch.bench.report import format_report

if len(sys.argv) != 2:
    sys.exit("usage: python -m batch.bench REPORT.json (the JSON komt-batch bench writes: its output setting)")
try:
    report = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    table = format_report(report)
except (OSError, ValueError, KeyError, TypeError) as e:
    sys.exit(f"python -m batch.bench: {sys.argv[1]}: not a bench report ({type(e).__name__}: {e})")
print(table)
