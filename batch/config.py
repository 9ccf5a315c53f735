"""The job file: dataclasses, loading, `dotted.key=value` overrides, validation with clear errors.

A job file is YAML with the sections below; every key has a default except `input.path` (or
`input.dataset`) and `output.path`. Unknown keys, wrong types and out-of-range values raise JobError
naming the file and the dotted key (and, for a typo, the closest valid key).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from batch.errors import JobError
from batch.results import GENERATED_COLUMNS

DEFAULT_STOP = ["<|end|>", "<s>", "###"]
DEFAULT_TEMPLATE = "### instruction: {instruction}\n\n### Response:"


@dataclass
class ModelConfig:
    base: str = "davidkim205/komt-Llama-2-7b-chat-hf"  # hub id or local directory
    adapter: str | None = None  # PEFT LoRA adapter: hub id or local directory
    quantization: str = "nf4"  # nf4 | int8 | none
    compute_dtype: str = "bfloat16"  # bfloat16 | float16 | float32
    device_map: str = "auto"
    trust_remote_code: bool = False  # never on unless the job file says so
    # How NF4 weights are held while generating (a property of the device, not of the outputs' settings):
    # nf4 = stay 4-bit; dequantized = dequantize once to compute_dtype; auto = dequantize when they fit
    weights: str = "auto"
    cuda_graphs: bool = True  # replay the decode step as CUDA graphs on a GPU (ignored on the CPU)
    # Merge the LoRA adapter into the (dequantized) weights: no adapter cost per step, other rounding
    merge_adapter: bool = False

    def validate(self, where: str) -> None:
        _choice(where, "model.quantization", self.quantization, ("nf4", "int8", "none"))
        _choice(where, "model.compute_dtype", self.compute_dtype, ("bfloat16", "float16", "float32"))
        _choice(where, "model.weights", self.weights, ("auto", "nf4", "dequantized"))
        if self.merge_adapter and not self.adapter:
            raise JobError(f"{where}: model.merge_adapter: needs model.adapter (there is no adapter to merge)")
        if self.merge_adapter and self.quantization == "int8":
            raise JobError(f"{where}: model.merge_adapter: not with quantization int8 (it merges into dequantized NF4 or unquantized weights)")
        if self.merge_adapter and self.quantization == "nf4" and self.weights == "nf4":
            raise JobError(f"{where}: model.merge_adapter: the adapter merges into dequantized weights; set model.weights to dequantized or auto, not nf4")


@dataclass
class InputConfig:
    # Exactly one of path and dataset names the input.
    path: str = ""  # a .jsonl/.jsonl.gz/.parquet file, a glob, a directory of such files, or a save_to_disk folder
    dataset: str | None = None  # a Hugging Face dataset id (org/name), read from the local cache
    config: str | None = None  # the dataset's config; needed when the cache holds several
    split: str | None = None  # the split of a Hub dataset or a saved DatasetDict; needed when it has several
    id_column: str | None = None  # without it a row's id is its position in the input
    too_long: str = "error"  # error | truncate: what to do with a prompt that does not fit
    reuse: str | None = None  # glob of earlier outputs whose matching rows are carried over

    def validate(self, where: str) -> None:
        if bool(self.path) == bool(self.dataset):
            raise JobError(
                f"{where}: input.path: {'name one of input.path and input.dataset, not both' if self.path else 'required'} "
                "(a .jsonl/.jsonl.gz/.parquet file, glob, directory or save_to_disk folder; or input.dataset: a Hugging Face dataset id)"
            )
        if self.config is not None and not self.dataset:
            raise JobError(f"{where}: input.config: only for input.dataset (a Hugging Face dataset id)")
        _choice(where, "input.too_long", self.too_long, ("error", "truncate"))


@dataclass
class PromptConfig:
    template: str = DEFAULT_TEMPLATE  # {name} is filled from the input column `name`


@dataclass
class GenerationSettings:
    """Generation settings: names as in transformers' GenerationConfig, plus `stop` and `seed`, and
    vLLM's SamplingParams' stop_token_ids and include_stop_str_in_output. The stop rule: batch.stops."""

    max_new_tokens: int = 512
    do_sample: bool = True
    temperature: float = 0.9
    top_p: float = 0.7
    top_k: int = 100
    seed: int = 0
    stop: list[str] = field(default_factory=lambda: list(DEFAULT_STOP))
    stop_token_ids: list[int] = field(default_factory=list)  # tokens that end a row, beside EOS
    min_new_tokens: int = 0  # no EOS, stop token or stop word ends a row before this many tokens
    repetition_penalty: float = 1.0  # transformers' RepetitionPenaltyLogitsProcessor over prompt + answer
    include_stop_str_in_output: bool = False  # keep the stop word (or stop token's text) in the response

    def validate(self, where: str) -> None:
        _at_least(where, "generation.max_new_tokens", self.max_new_tokens, 1)
        _at_least(where, "generation.top_k", self.top_k, 0)
        if not 0 < self.top_p <= 1:
            raise JobError(f"{where}: generation.top_p: must be in (0, 1], got {self.top_p}")
        if not 0 < self.temperature < math.inf:  # (NaN too)
            raise JobError(f"{where}: generation.temperature: must be a number > 0, got {self.temperature}")
        if any(not s for s in self.stop):
            raise JobError(f"{where}: generation.stop: stop words must be non-empty strings")
        if any(t < 0 for t in self.stop_token_ids):
            raise JobError(f"{where}: generation.stop_token_ids: token ids must be >= 0, got {self.stop_token_ids}")
        _at_least(where, "generation.min_new_tokens", self.min_new_tokens, 0)
        if self.min_new_tokens > self.max_new_tokens:
            raise JobError(f"{where}: generation.min_new_tokens: must be <= generation.max_new_tokens ({self.max_new_tokens}), got {self.min_new_tokens}")
        if not 0 < self.repetition_penalty < math.inf:  # (NaN too)
            raise JobError(f"{where}: generation.repetition_penalty: must be a number > 0, got {self.repetition_penalty}")

    def check_tokens(self, where: str, vocabulary: int) -> None:
        """The stop token ids are tokens of the model's tokenizer (of `vocabulary` tokens)."""
        outside = [t for t in self.stop_token_ids if t >= vocabulary]
        if outside:
            raise JobError(f"{where}: generation.stop_token_ids: {outside[0]} is not a token of the model (its tokenizer has {vocabulary})")


@dataclass
class BatchingConfig:
    max_batch_size: int = 32  # rows per planned batch (the unit of commits)
    max_batch_tokens: int = 32768  # rows x (longest prompt in the batch + max_new_tokens)
    # Rows generating at once, and their KV-cache budget in tokens: properties of the device, not of
    # the plan (kept out of its fingerprint). null = sized from the GPU's free memory (on the CPU:
    # max_batch_size rows within max_batch_tokens).
    running_rows: int | None = None
    running_tokens: int | None = None
    memory_headroom: float = 0.1  # the fraction of the GPU's free memory left unused when sizing them
    # Prompt prefixes that rows share (found on their token ids) prefilled once, not once per row. The
    # outputs do not depend on it (kept out of the plan's fingerprint): false only to compare.
    share_prefix: bool = True

    def validate(self, where: str) -> None:
        _at_least(where, "batching.max_batch_size", self.max_batch_size, 1)
        _at_least(where, "batching.max_batch_tokens", self.max_batch_tokens, 1)
        if self.running_rows is not None:
            _at_least(where, "batching.running_rows", self.running_rows, 1)
        if self.running_tokens is not None:
            _at_least(where, "batching.running_tokens", self.running_tokens, 1)
        if not 0 <= self.memory_headroom < 1:
            raise JobError(f"{where}: batching.memory_headroom: must be in [0, 1), got {self.memory_headroom}")


@dataclass
class OutputConfig:
    path: str = ""  # the final Parquet file
    response_column: str = "response"

    def validate(self, where: str) -> None:
        if not self.path:
            raise JobError(f"{where}: output.path: required (the Parquet file to write)")
        if not self.response_column:
            raise JobError(f"{where}: output.response_column: must not be empty")
        if self.response_column in GENERATED_COLUMNS:
            raise JobError(
                f"{where}: output.response_column: {self.response_column!r} is one of the columns the job adds "
                f"({', '.join(GENERATED_COLUMNS)}); choose another name"
            )


@dataclass
class CheckpointConfig:
    # A 7B model in NF4 on one GPU makes roughly 1-3 rows/s at 512 new tokens: 256 rows or 5 minutes,
    # whichever comes first, bounds a crash's loss to a few minutes of GPU time.
    every_rows: int = 256
    every_seconds: float = 300.0
    keep: bool = False  # keep the chunk files after the final file is written
    dir: str | None = None  # default: <output.path>.parts

    def validate(self, where: str) -> None:
        _at_least(where, "checkpoint.every_rows", self.every_rows, 1)
        if not self.every_seconds > 0:  # (NaN too; .inf: by rows only)
            raise JobError(f"{where}: checkpoint.every_seconds: must be > 0, got {self.every_seconds}")


@dataclass
class CpuConfig:
    # torch's threads on the CPU; null = OMP_NUM_THREADS when set, else one per CPU the process may
    # use (affinity, cgroup quota, SLURM_CPUS_PER_TASK), fewer while other processes use those CPUs
    # (batch/threads.py). A property of the machine, not of the outputs.
    threads: int | None = None
    # passive | active; null = OMP_WAIT_POLICY when set, else OpenMP's default when the job chooses
    # the threads (and adapts them), passive when they are set. Set, it keeps the threads fixed.
    wait_policy: str | None = None

    def validate(self, where: str) -> None:
        if self.threads is not None:
            _at_least(where, "cpu.threads", self.threads, 1)
        if self.wait_policy is not None:
            _choice(where, "cpu.wait_policy", self.wait_policy, ("passive", "active"))


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    input: InputConfig = field(default_factory=InputConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    cpu: CpuConfig = field(default_factory=CpuConfig)
    source: str = field(default="<job>", metadata={"internal": True})  # the job file, for messages
    text: str = field(default="", metadata={"internal": True})  # the job file as read

    @property
    def parts_dir(self) -> Path:
        return Path(self.checkpoint.dir or self.output.path + ".parts")

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "validate"):
                section.validate(self.source)
        written = [self.output.response_column, *GENERATED_COLUMNS]
        if self.input.id_column in written:
            raise JobError(
                f"{self.source}: input.id_column: {self.input.id_column!r} is a column the job writes "
                f"({', '.join(written)}); an input column cannot share its name"
            )

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("source"), d.pop("text")
        return d


# --- loading -------------------------------------------------------------------------------------

# The paths the job reads or writes: `~` is expanded in all; {date}, {time}, {job_id} are filled in
# all but the model's (a hub id or a local directory).
PLACEHOLDER_PATHS = ("input.path", "output.path", "checkpoint.dir", "input.reuse")
PATHS = (*PLACEHOLDER_PATHS, "model.base", "model.adapter")


def load_job(path: str | Path, overrides: list[str] = (), fill: dict[str, str] | None = None) -> JobConfig:
    """Read a job file, apply `dotted.key=value` overrides, fill {date}/{time}/{job_id} in paths."""
    where = str(path)
    if not is_utf8(where):
        raise JobError(f"{shown_name(where)}: the job file's name is not UTF-8 text (the output records it); rename the file")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise JobError(f"{where}: job file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise JobError(f"{where}: cannot read the job file: {e}") from None
    try:
        raw = yaml.load(text, Loader=_JobLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        kind = "YAML" if isinstance(e, yaml.constructor.ConstructorError) else "YAML syntax error"
        raise JobError(f"{where}: {kind}{line}: {problem}") from None
    if raw is None or isinstance(raw, _Plain) and raw.value is None:
        raw = {}
    if not isinstance(raw, dict):
        raise JobError(f"{where}: the job file must be a mapping of sections (model, input, ...)")
    for item in overrides:
        _apply_override(raw, item, where)
    try:
        job = _build(JobConfig, raw, where, prefix="")
        job.source, job.text = where, text
        for key in PATHS:
            section_name, name = key.split(".")
            section = getattr(job, section_name)
            value = getattr(section, name)
            if value and not is_utf8(value):
                raise JobError(f"{where}: {key}: {shown_name(value)} is not UTF-8 text (the output records it); choose a UTF-8 name")
            if value and fill and key in PLACEHOLDER_PATHS:
                value = fill_placeholders(value, fill, where, key)
            if value:
                setattr(section, name, expand_home(value, where, key))
        job.validate()
    except JobError as e:
        raise JobError(blame_overrides(str(e), overrides)) from None
    return job


def is_utf8(name: str) -> bool:
    """False for a name with bytes that are not UTF-8 (Python keeps them as lone surrogates)."""
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def shown_name(name: str) -> str:
    """A file name for a message: bytes that are not UTF-8 shown as \\xNN."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def blame_overrides(message: str, overrides: list[str]) -> str:
    """An error about a setting that a command-line override set says so (the file is not at fault).
    The setting is the message's own, `FILE: KEY: ...` or `FILE: unknown key KEY; ...`; an override
    sets it when its key is that key or a section holding it (`model={base: m}` for model.base), or,
    for an unknown key, a key under it (`nosuch.key=1` for `unknown key nosuch`). load_job blames the
    errors of the job file; the CLI those found later (the input, the model)."""
    if "(set on the command line: " in message:
        return message
    m = re.match(r"(unknown key )?([A-Za-z_]\w*(?:\.\w+)*)(?=[:;,( ]|$)", message.partition(": ")[2])
    if not m:
        return message
    unknown, setting = m.groups()

    def sets(key: str) -> bool:
        return bool(key) and (setting == key or setting.startswith(key + ".") or bool(unknown) and key.startswith(setting + "."))

    named = [item for item in overrides if "=" in item and sets(item.partition("=")[0])]
    return message + (f" (set on the command line: {shown_name(named[-1])})" if named else "")


def expand_home(value: str, where: str, key: str) -> str:
    """`~` and `~user` at the start of a path, as a shell would expand them (never a folder named ~)."""
    expanded = os.path.expanduser(value)
    if expanded.startswith("~"):
        raise JobError(f"{where}: {key}: cannot expand {expanded.split('/')[0]!r} in {value!r}: no such user or no home directory")
    return expanded


def fill_placeholders(value: str, fill: dict[str, str], where: str, key: str) -> str:
    """Fill {date}, {time}, {job_id} in a path; other braces are an error (paths have no other)."""
    try:
        return value.format(**fill)
    except (KeyError, IndexError, ValueError) as e:
        raise JobError(
            f"{where}: {key}: bad placeholder {e} in {value!r}; paths may use {{date}}, {{time}}, {{job_id}}"
        ) from None


def _apply_override(raw: dict, item: str, where: str, root: type | None = None) -> None:
    """Set `dotted.key=value` in the raw job (root: its dataclass, JobConfig by default).

    What the value means depends on the setting it sets, never on what YAML would make of it: a text
    setting takes the text exactly as written (spaces, `#`, `~`, `010`, `yes` included; an optional
    one is unset by an empty value or `null`); a list of text is `[a, b, c]` (items as written, or
    quoted) or one item as written; any other setting takes one YAML value, or is refused."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise JobError(f"override {item!r}: expected dotted.key=value, e.g. generation.max_new_tokens=64")
    tp = _field_type(root or JobConfig, key)
    parsed = value if tp is None else _parse_override(tp, value, f"{where}: {key}", f" (set on the command line: {item})")
    node = raw
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise JobError(f"override {item!r}: {p} is not a section")
    node[parts[-1]] = parsed


def _field_type(root: type, key: str) -> Any:
    """The declared type of the dotted key in the dataclass root; None for a key it does not have
    (the job's own check names it, with the closest key)."""
    tp = root
    for name in key.split("."):
        if not dataclasses.is_dataclass(tp) or name not in {f.name for f in dataclasses.fields(tp) if not f.metadata.get("internal")}:
            return None
        tp = typing.get_type_hints(tp)[name]
    return tp


def _optional(tp: Any) -> tuple[Any, bool]:
    """A field's type without its `| None`, and whether it allows None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        (inner,) = [a for a in args if a is not type(None)]
        return inner, type(None) in args
    return tp, False


def _parse_override(tp: Any, value: str, what: str, blame: str) -> Any:
    tp, optional = _optional(tp)
    if tp is str:
        return None if optional and value in ("", "null") else value
    if typing.get_origin(tp) is list and typing.get_args(tp) == (str,):
        return _text_list(value, what, blame)
    if not value.strip():
        return None  # unset: an optional setting's default; refused for the others
    try:  # a number, true/false or a section: one YAML value, and nothing after it (a comment would be lost)
        node = yaml.compose(value, Loader=yaml.SafeLoader)
        if node is not None and not value[node.end_mark.index :].strip():
            return yaml.load(value, Loader=_JobLoader)  # (a section: its text settings as in the job file)
    except yaml.YAMLError:
        pass
    raise JobError(f"{what}: expected {_type_name(tp)}, got {value!r}{blame}")


# One item of a list written [a, b, c]: a quoted YAML string, or text without , [ ] { } that does not
# start with a quote (spaces around it are not part of it).
_LIST_ITEM = re.compile(r"""\s*("(?:[^"\\]|\\.)*"|'(?:[^']|'')*'|[^\s,"'\[\]{}](?:[^,\[\]{}]*[^\s,\[\]{}])?)\s*(?:,|\Z)""")


def _text_list(value: str, what: str, blame: str) -> list[str]:
    """A list of text on the command line: `[a, b, c]`, each item as written or quoted ("a, b",
    " leading space", "\\n"), or, without brackets, one item exactly as written."""
    body = value.strip()
    if not body.startswith("["):
        return [value]
    refused = JobError(
        f"{what}: expected a list written [a, b, c] (quote an item that holds , [ ] {{ }} or starts with a quote or a space), got {value!r}{blame}"
    )
    if not body.endswith("]"):
        raise refused
    inner, items, pos = body[1:-1], [], 0
    while inner[pos:].strip():
        m = _LIST_ITEM.match(inner, pos)
        if not m:
            raise refused
        token = m.group(1)
        try:
            items.append(yaml.safe_load(token) if token[0] in "\"'" else token)
        except yaml.YAMLError:  # a quoted item with a bad escape
            raise refused from None
        pos = m.end()
    return items


class _JobLoader(yaml.SafeLoader):
    """YAML's safe loader that keeps the text of plain scalars it reads as numbers, true/false, dates
    or null: a text setting takes them as written (`response_column: 010` is '010', not 8); a key
    written twice in one mapping is refused (YAML would keep the last value silently)."""

    def construct_mapping(self, node, deep=False):
        first: dict[tuple[str, str], int] = {}
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                if (key.tag, key.value) in first:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"{key.value!r} is written twice in one mapping (first at line {first[key.tag, key.value]}); one value would be lost", key.start_mark
                    )
                first[key.tag, key.value] = key.start_mark.line + 1
        return super().construct_mapping(node, deep)


@dataclass(frozen=True, repr=False)
class _Plain:
    value: Any  # what YAML reads: 8 for 010, True for yes
    text: str  # as written

    def __repr__(self) -> str:  # in a message: what the user wrote
        return self.text


def _keeping_text(construct):
    def construct_plain(loader, node):
        value = construct(loader, node)
        return _Plain(value, node.value) if node.style is None else value

    return construct_plain


for _tag in ("bool", "int", "float", "timestamp", "null"):
    _tag = f"tag:yaml.org,2002:{_tag}"
    _JobLoader.add_constructor(_tag, _keeping_text(yaml.SafeLoader.yaml_constructors[_tag]))


def _build(cls: type, raw: Any, where: str, prefix: str) -> Any:
    """Build dataclass `cls` from a dict, checking every key and type against the dataclass."""
    if not isinstance(raw, dict):
        raise JobError(f"{where}: {prefix.rstrip('.') or 'job'}: expected a mapping, got {_kind(raw)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        key = key.text if isinstance(key, _Plain) else key
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; valid keys: {', '.join(fields)}"
            raise JobError(f"{where}: unknown key {prefix}{key}{hint}")
        kwargs[key] = _coerce(hints[key], value, where, f"{prefix}{key}")
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str, key: str) -> Any:
    if isinstance(value, _Plain) and value.value is None:  # null, nothing, or ~
        if value.text == "~" and str in (tp, *typing.get_args(tp)):  # a text setting: on the command line ~ is text
            none = "[] for none" if typing.get_origin(tp) is list else "null for nothing"
            raise JobError(f"{where}: {key}: ~ is YAML's null (nothing), not the home folder; write '~' in quotes for the text ~, or {none}")
        value = None
    if dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, where, key + ".")
    tp, optional = _optional(tp)
    if optional and value is None:
        return None
    written = value  # (for a message: a plain scalar's text as written)
    if isinstance(value, _Plain):  # a text setting takes the text as written; others YAML's value
        value = value.text if tp is str or typing.get_args(tp) == (str,) else value.value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, item) and not isinstance(value, bool):
            value = [value]
        items = "strings" if item is str else "integers"
        if isinstance(value, list):
            value = [(v.text if item is str else v.value) if isinstance(v, _Plain) else v for v in value]
            bad = [(i, v) for i, v in enumerate(value) if not isinstance(v, item) or isinstance(v, bool)]
            if not bad:
                return [item(v) for v in value]
            i = bad[0][0]
            shown = written[i] if isinstance(written, list) else value[i]  # (as written, where the file gave a list)
            what = _kind(shown) if isinstance(shown, _Plain) else f"{_kind(shown)} {shown!r}"
            raise JobError(f"{where}: {key}: expected a list of {items}, got {what} as item {i + 1}")
        raise JobError(f"{where}: {key}: expected a list of {items}, got {_kind(written)}" + ("; [] for none" if value is None else ""))
    raise JobError(f"{where}: {key}: expected {_type_name(tp)}, got {_kind(value)}{'' if value is None else f' {value!r}'}")


def _type_name(tp: Any) -> str:
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _kind(value: Any) -> str:
    if isinstance(value, _Plain):  # a plain YAML scalar: its kind and its text as written
        return "nothing" if value.value is None else f"{_kind(value.value)} {value.text}"
    return {dict: "a mapping", list: "a list", type(None): "nothing"}.get(type(value), type(value).__name__)


def _choice(where: str, key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise JobError(f"{where}: {key}: must be one of {', '.join(allowed)}, got {value!r}")


def _at_least(where: str, key: str, value: int, low: int) -> None:
    if value < low:
        raise JobError(f"{where}: {key}: must be >= {low}, got {value}")
