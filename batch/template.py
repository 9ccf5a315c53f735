"""Row -> prompt text: the job's template with {column} placeholders (pure)."""

from __future__ import annotations

import string
from dataclasses import dataclass

from batch.errors import JobError


@dataclass(frozen=True)
class Template:
    text: str
    fields: tuple[str, ...]  # the input columns the template uses, in order of first use

    def uses(self, name: str) -> int:
        """How many times the template places column `name`."""
        return sum(field == name for _, field, _, _ in string.Formatter().parse(self.text))

    @classmethod
    def parse(cls, text: str, where: str = "<job>") -> Template:
        fields: list[str] = []
        try:
            parsed = list(string.Formatter().parse(text))
        except ValueError as e:
            raise JobError(f"{where}: prompt.template: bad placeholder ({e}); use {{column}}, and {{{{ }}}} for braces") from None
        for _, name, spec, conv in parsed:
            if name is None:
                continue
            if not name.isidentifier() or spec or conv:
                shown = "{" + name + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
                raise JobError(
                    f"{where}: prompt.template: bad placeholder {shown}; use {{column}} with a column name"
                )
            if name not in fields:
                fields.append(name)
        if not fields:
            raise JobError(f"{where}: prompt.template: names no input column, e.g. {{instruction}}")
        return cls(text, tuple(fields))

    def check_columns(self, columns: list[str], where: str) -> None:
        missing = [f for f in self.fields if f not in columns]
        if missing:
            raise JobError(
                f"{where}: prompt.template: column {missing[0]!r} is not in the input (columns: {', '.join(columns)})"
            )

    def render(self, values: dict[str, object]) -> str:
        """The prompt for one row. Raises ValueError (the row's error) for a null, empty or non-string field."""
        for name in self.fields:
            v = values.get(name)
            if v is None:
                raise ValueError(f"template field {name!r} is null")
            if not isinstance(v, str):
                raise ValueError(f"template field {name!r} is {type(v).__name__}, not a string")
            if not v.strip():
                raise ValueError(f"template field {name!r} is empty")
        return self.text.format(**{name: values[name] for name in self.fields})
