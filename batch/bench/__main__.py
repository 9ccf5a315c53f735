"""python -m batch.bench REPORT.json: the table of a report's JSON, e.g. of a bench stopped before its end."""

import json
import sys
from pathlib import Path

from batch.bench.report import format_report

print(format_report(json.loads(Path(sys.argv[1]).read_text())))
