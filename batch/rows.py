"""The job's input rows: the table the readers give, each row's id, and its prompt from the template."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from batch.config import JobConfig
from batch.errors import JobError
from batch.readers import input_files, input_root, read_table, row_ids
from batch.results import GENERATED_COLUMNS
from batch.template import Template

PROMPT_SLICE = 8192  # rows rendered and tokenized at a time while planning


@dataclass
class Rows:
    files: list[Path]
    table: pa.Table
    ids: list[str]
    template: Template

    def prompts(self, indices: list[int]) -> list[str | ValueError]:
        """The prompts of these rows; a row whose template field is bad gives its ValueError."""
        values = self.table.select(list(self.template.fields)).take(indices).to_pylist()
        return [_render(self.template, v) for v in values]

    def slices(self):
        """(first row, prompts) for consecutive slices of the input."""
        fields = list(self.template.fields)
        for start in range(0, self.table.num_rows, PROMPT_SLICE):
            values = self.table.slice(start, PROMPT_SLICE).select(fields).to_pylist()
            yield start, [_render(self.template, v) for v in values]


def _render(template: Template, values: dict) -> str | ValueError:
    try:
        return template.render(values)
    except ValueError as e:
        return e


def read_rows(job: JobConfig) -> Rows:
    where = job.source
    try:
        files = input_files(job.input.path)
    except JobError as e:
        raise JobError(f"{where}: {e}") from None
    out = Path(job.output.path).resolve()
    if any(f.resolve() == out for f in files):
        raise JobError(f"{where}: output.path: {job.output.path} is also an input file; choose another path")
    template = Template.parse(job.prompt.template, where)
    table = read_table(files, input_root(job.input.path))
    if table.num_rows == 0:  # an empty input has no columns to speak of: give it the template's
        for name in [*template.fields, *([job.input.id_column] if job.input.id_column else [])]:
            if name not in table.column_names:
                table = table.append_column(name, pa.array([], pa.string()))
    template.check_columns(table.column_names, where)
    for name in [job.output.response_column, *GENERATED_COLUMNS]:
        if name in table.column_names:
            raise JobError(
                f"{where}: output: the input already has a column {name!r}; the output would repeat it"
                + (" (set output.response_column to another name)" if name == job.output.response_column else "")
            )
    return Rows(files, table, row_ids(table, job.input.id_column, where), template)
