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
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    input: InputConfig = field(default_factory=InputConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
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
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise JobError(f"{where}: job file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise JobError(f"{where}: cannot read the job file: {e}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise JobError(f"{where}: YAML syntax error{line}: {problem}") from None
    if raw is None:
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
            if value and fill and key in PLACEHOLDER_PATHS:
                value = fill_placeholders(value, fill, where, key)
            if value:
                setattr(section, name, expand_home(value, where, key))
        job.validate()
    except JobError as e:
        raise JobError(_blame_overrides(str(e), overrides)) from None
    return job


def _blame_overrides(message: str, overrides: list[str]) -> str:
    """A job-file error about a key that a command-line override set says so (the file is not at fault)."""
    keys = [item.partition("=")[0] for item in overrides]
    named = [item for item, key in zip(overrides, keys) if re.search(rf"(?<![\w.]){re.escape(key)}(?![\w])", message)]
    return message + (f" (set on the command line: {named[-1]})" if named else "")


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


def _apply_override(raw: dict, item: str, where: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise JobError(f"override {item!r}: expected dotted.key=value, e.g. generation.max_new_tokens=64")
    try:
        parsed = yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError:
        parsed = value
    if isinstance(parsed, dict):  # "Q: {question}" is text, not a mapping: values are scalars (or lists)
        parsed = value
    if type(parsed) in (int, float):  # remember how it was written, for a text setting (010 stays '010', not 8)
        parsed = _WRITTEN[type(parsed)](parsed)
        parsed.text = value
    node = raw
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise JobError(f"override {item!r}: {p} is not a section")
    node[parts[-1]] = parsed


class _WrittenInt(int):
    text: str


class _WrittenFloat(float):
    text: str


_WRITTEN = {int: _WrittenInt, float: _WrittenFloat}


def _build(cls: type, raw: Any, where: str, prefix: str) -> Any:
    """Build dataclass `cls` from a dict, checking every key and type against the dataclass."""
    if not isinstance(raw, dict):
        raise JobError(f"{where}: {prefix.rstrip('.') or 'job'}: expected a mapping, got {_kind(raw)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; valid keys: {', '.join(fields)}"
            raise JobError(f"{where}: unknown key {prefix}{key}{hint}")
        kwargs[key] = _coerce(hints[key], value, where, f"{prefix}{key}")
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str, key: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, where, key + ".")
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (tp,) = [a for a in args if a is not type(None)]
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
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not key.endswith("template"):
            return getattr(value, "text", str(value))
    elif typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, item) and not isinstance(value, bool):
            value = [value]
        if isinstance(value, list) and all(isinstance(v, item) and not isinstance(v, bool) for v in value):
            return [item(v) for v in value]
        raise JobError(f"{where}: {key}: expected a list of {'strings' if item is str else 'integers'}, got {_kind(value)}")
    raise JobError(f"{where}: {key}: expected {_type_name(tp)}, got {_kind(value)} {value!r}")


def _type_name(tp: Any) -> str:
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", type(None): "nothing"}.get(type(value), type(value).__name__)


def _choice(where: str, key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise JobError(f"{where}: {key}: must be one of {', '.join(allowed)}, got {value!r}")


def _at_least(where: str, key: str, value: int, low: int) -> None:
    if value < low:
        raise JobError(f"{where}: {key}: must be >= {low}, got {value}")
