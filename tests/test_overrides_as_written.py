"""Values given on the command line (and text settings in the job file) are taken as written
(issue 20 class 1, issue 22 defect 2).

What an override means depends on the setting it sets, never on what YAML makes of the text: a text
setting takes the text exactly as written; a list of text is `[a, b, c]` or one item, or is refused;
any other setting takes one YAML value or is refused in one line naming the key and the override.
`validate` and `run` read overrides alike (both through load_job) and agree."""

import json

import pyarrow.parquet as pq
import pytest

from batch import runner
from batch.cli import main
from batch.config import load_job
from batch.errors import JobError
from tests.conftest import make_job, write_jsonl
from tests.test_config import BASE

MODEL_CARD_TEMPLATE = "### instruction: {instruction}\n\n### Response:"  # what bash's $'...\n\n...' passes


def over_base(text: str) -> str:
    """BASE with the sections that `text` writes taken from `text` (a section written twice is refused)."""
    own = {line.split(":")[0] for line in text.splitlines() if line[:1].strip()}
    kept, skip = [], False
    for line in BASE.splitlines(keepends=True):
        if line[:1].strip():
            skip = line.split(":")[0] in own
        if not skip:
            kept.append(line)
    return "".join(kept) + text


def write(tmp_path, text=BASE):
    p = tmp_path / "job.yaml"
    p.write_text(text)
    return p


def setting(job, dotted):
    section, name = dotted.split(".")
    return getattr(getattr(job, section), name)


# override -> (setting, value it must have)
TAKEN = {
    # text: exactly as written
    "output.path=out/a #1.parquet": ("output.path", "out/a #1.parquet"),  # ` #` is no comment
    "output.path=out/#.parquet": ("output.path", "out/#.parquet"),
    "prompt.template=#{instruction}": ("prompt.template", "#{instruction}"),  # `#` first: not "nothing"
    "prompt.template=Q: {instruction} # not a comment": ("prompt.template", "Q: {instruction} # not a comment"),
    f"prompt.template={MODEL_CARD_TEMPLATE}": ("prompt.template", MODEL_CARD_TEMPLATE),
    "prompt.template=Q: {instruction}\nA: ": ("prompt.template", "Q: {instruction}\nA: "),  # trailing space kept
    "prompt.template={instruction}: [{id}]": ("prompt.template", "{instruction}: [{id}]"),  # not a mapping, not a list
    "output.response_column=010": ("output.response_column", "010"),  # not 8
    "output.response_column=0x1F": ("output.response_column", "0x1F"),
    "output.response_column=1e3": ("output.response_column", "1e3"),
    "output.response_column=1:30": ("output.response_column", "1:30"),  # not 90
    "output.response_column=yes": ("output.response_column", "yes"),  # not true
    "output.response_column=~": ("output.response_column", "~"),  # not null
    "output.response_column=null": ("output.response_column", "null"),  # (a setting that cannot be unset)
    "output.response_column=2026-11-27": ("output.response_column", "2026-11-27"),  # not a date
    "output.response_column= padded ": ("output.response_column", " padded "),  # spaces are text
    # optional text: unset by nothing or null, else as written (`~` is the home folder, not null)
    "checkpoint.dir=~": ("checkpoint.dir", "/home/me"),
    "checkpoint.dir=~/parts #2": ("checkpoint.dir", "/home/me/parts #2"),
    "checkpoint.dir=": ("checkpoint.dir", None),
    "checkpoint.dir=null": ("checkpoint.dir", None),
    "model.adapter=null": ("model.adapter", None),
    "input.id_column=010": ("input.id_column", "010"),
    # a list of text: [a, b, c] with items as written, or quoted; without brackets one item as written
    "generation.stop=[<|end|>, <s>, ###]": ("generation.stop", ["<|end|>", "<s>", "###"]),  # the README's default
    "generation.stop=###": ("generation.stop", ["###"]),  # the model card's stop word
    "generation.stop=### Response: #": ("generation.stop", ["### Response: #"]),
    "generation.stop=[###, # end]": ("generation.stop", ["###", "# end"]),
    "generation.stop=[a, b,]": ("generation.stop", ["a", "b"]),
    "generation.stop=[ 010 , yes, ~, null ]": ("generation.stop", ["010", "yes", "~", "null"]),
    'generation.stop=["a, b", \' x\', "\\n", \'it\'\'s\', "[INST]"]': ("generation.stop", ["a, b", " x", "\n", "it's", "[INST]"]),
    "generation.stop=[]": ("generation.stop", []),
    "generation.stop=1.5": ("generation.stop", ["1.5"]),
    "generation.stop=<s>": ("generation.stop", ["<s>"]),
    # numbers and true/false: YAML's value
    "generation.max_new_tokens=0x10": ("generation.max_new_tokens", 16),
    "generation.max_new_tokens= 64 ": ("generation.max_new_tokens", 64),
    "generation.top_p=.5": ("generation.top_p", 0.5),
    "generation.temperature=1": ("generation.temperature", 1.0),
    "generation.do_sample=no": ("generation.do_sample", False),
    "generation.do_sample=true": ("generation.do_sample", True),
    "batching.running_rows=null": ("batching.running_rows", None),
    "batching.running_rows=": ("batching.running_rows", None),
    "batching.running_rows=~": ("batching.running_rows", None),
    "checkpoint.every_seconds=.inf": ("checkpoint.every_seconds", float("inf")),
    # a section: one YAML mapping, read as the job file is
    "output={path: o.parquet, response_column: 010}": ("output.response_column", "010"),
    "generation={max_new_tokens: 0x10, stop: [a, 1.0]}": ("generation.stop", ["a", "1.0"]),
}


@pytest.mark.parametrize("item", list(TAKEN))
def test_an_override_is_taken_as_written(tmp_path, monkeypatch, item):
    monkeypatch.setenv("HOME", "/home/me")
    key, expected = TAKEN[item]
    value = setting(load_job(write(tmp_path), [item]), key)
    assert value == expected and type(value) is type(expected)


# override -> the message after "<job file>: " (one line, naming the key and the override)
REFUSED = {
    "generation.stop=[a, b": "generation.stop: expected a list written [a, b, c] (quote an item that holds , [ ] { } or starts "
                             "with a quote or a space), got '[a, b'",
    "generation.stop=[[a], b]": "generation.stop: expected a list written [a, b, c]",
    "generation.stop=[a,,b]": "generation.stop: expected a list written [a, b, c]",
    "generation.stop=[a] b": "generation.stop: expected a list written [a, b, c]",
    'generation.stop=["\\q"]': "generation.stop: expected a list written [a, b, c]",  # a bad escape in a quoted item
    'generation.stop=["a" b]': "generation.stop: expected a list written [a, b, c]",
    "generation.stop=[{a: 1}]": "generation.stop: expected a list written [a, b, c]",
    "generation.stop=[a, '']": "generation.stop: stop words must be non-empty strings",
    "generation.max_new_tokens=64 # tokens": "generation.max_new_tokens: expected an integer, got '64 # tokens'",  # a comment would be lost
    "generation.max_new_tokens=#": "generation.max_new_tokens: expected an integer, got '#'",
    "generation.max_new_tokens=[1,": "generation.max_new_tokens: expected an integer, got '[1,'",
    "generation.max_new_tokens=": "generation.max_new_tokens: expected an integer, got nothing",
    "generation.max_new_tokens=abc": "generation.max_new_tokens: expected an integer, got str 'abc'",
    "generation.max_new_tokens=1.5": "generation.max_new_tokens: expected an integer, got float 1.5",
    "generation.top_p=1.0 #": "generation.top_p: expected a number, got '1.0 #'",
    "generation.top_p=[0.5]": "generation.top_p: expected a number, got a list [0.5]",
    "generation.do_sample=maybe": "generation.do_sample: expected true/false, got str 'maybe'",
    "generation.do_sample=1": "generation.do_sample: expected true/false, got int 1",
    "generation.temperature=0": "generation.temperature: must be a number > 0, got 0.0",
    "output.path=": "output.path: required (the Parquet file to write)",
    "generation=[1]": "generation: expected a mapping, got a list",
    "generation.max_new_token=64": "unknown key generation.max_new_token; did you mean generation.max_new_tokens?",
}


@pytest.mark.parametrize("item", list(REFUSED))
def test_an_override_that_does_not_mean_what_it_says_is_refused(tmp_path, item):
    p = write(tmp_path)
    with pytest.raises(JobError) as e:
        load_job(p, [item])
    message = str(e.value)
    assert message.startswith(f"{p}: {REFUSED[item]}"), message
    assert message.endswith(f" (set on the command line: {item})"), message
    assert "\n" not in message and "_Plain" not in message and "Written" not in message  # one line, no internal types


# job file -> (setting, value): a text setting gets the scalar's text as written; others YAML's value
JOB_FILE = {
    "output:\n  path: out/x.parquet\n  response_column: 010\n": ("output.response_column", "010"),  # YAML 1.1: 8
    "output:\n  path: out/x.parquet\n  response_column: 0o17\n": ("output.response_column", "0o17"),
    "output:\n  path: out/x.parquet\n  response_column: 1_000\n": ("output.response_column", "1_000"),
    "output:\n  path: out/x.parquet\n  response_column: 1.50\n": ("output.response_column", "1.50"),
    "output:\n  path: out/x.parquet\n  response_column: .inf\n": ("output.response_column", ".inf"),
    "output:\n  path: out/x.parquet\n  response_column: yes\n": ("output.response_column", "yes"),
    "output:\n  path: out/x.parquet\n  response_column: Off\n": ("output.response_column", "Off"),
    "output:\n  path: out/x.parquet\n  response_column: 2026-11-27\n": ("output.response_column", "2026-11-27"),
    "output:\n  path: out/x.parquet\n  response_column: '010'\n": ("output.response_column", "010"),
    "input:\n  path: in.jsonl\n  id_column: 007\n": ("input.id_column", "007"),
    "input:\n  path: in.jsonl\n  id_column: null\n": ("input.id_column", None),  # an optional setting: YAML's null unsets it
    "input:\n  path: in.jsonl\n  id_column:\n": ("input.id_column", None),
    "checkpoint:\n  dir: '~'\n": ("checkpoint.dir", "/home/me"),
    "batching:\n  running_rows: ~\n": ("batching.running_rows", None),  # not a text setting: YAML's null
    "generation:\n  stop: [~, null, yes]\n": ("generation.stop", ["~", "null", "yes"]),  # as on the command line
    "model:\n  adapter: null\n": ("model.adapter", None),
    "generation:\n  stop: [010, yes, 1.0]\n": ("generation.stop", ["010", "yes", "1.0"]),
    "generation:\n  stop: 0x1F\n": ("generation.stop", ["0x1F"]),
    "generation:\n  max_new_tokens: 010\n": ("generation.max_new_tokens", 8),  # a number setting: YAML's number
    "generation:\n  do_sample: no\n": ("generation.do_sample", False),
    "generation:\n  top_p: 1\n": ("generation.top_p", 1.0),
}


@pytest.mark.parametrize("text", list(JOB_FILE))
def test_a_text_setting_in_the_job_file_keeps_the_text_as_written(tmp_path, monkeypatch, text):
    monkeypatch.setenv("HOME", "/home/me")
    key, expected = JOB_FILE[text]
    value = setting(load_job(write(tmp_path, over_base(text))), key)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(("text", "message"), [
    ("output:\n  path: out/x.parquet\n  response_column: null\n", "output.response_column: expected a string, got nothing"),
    ("output:\n  path: out/x.parquet\n  response_column:\n", "output.response_column: expected a string, got nothing"),
    # ~ alone: YAML's null, or the home folder the command line's ~ is? refused, not guessed
    ("output:\n  path: out/x.parquet\n  response_column: ~\n", "output.response_column: ~ is YAML's null (nothing), not the home folder; "
                                                                "write '~' in quotes for the text ~, or null for nothing"),
    ("checkpoint:\n  dir: ~\n", "checkpoint.dir: ~ is YAML's null (nothing), not the home folder"),
    ("input:\n  path: in.jsonl\n  id_column: ~\n", "input.id_column: ~ is YAML's null (nothing)"),
    ("generation:\n  max_new_tokens: yes\n", "generation.max_new_tokens: expected an integer, got bool True"),
    ("generation:\n  stop: [a, {b: 1}]\n", "generation.stop: expected a list of strings, got a mapping {'b': 1} as item 2"),
    ("generation:\n  stop: ~\n", "generation.stop: ~ is YAML's null (nothing), not the home folder; write '~' in quotes for the text ~, or [] for none"),
    ("1: x\n", "unknown key 1; valid keys:"),
    ("output:\n  path: out/x.parquet\n  response_column: {a: 010, b: yes}\n", "output.response_column: expected a string, got a mapping {'a': 010, 'b': yes}"),
])
def test_what_the_job_file_cannot_mean_is_refused(tmp_path, text, message):
    p = write(tmp_path, over_base(text))
    with pytest.raises(JobError) as e:
        load_job(p)
    assert str(e.value).startswith(f"{p}: {message}") and "_Plain" not in str(e.value)


@pytest.fixture
def no_model(monkeypatch):
    def touched(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(runner, "load_tokenizer", touched)


@pytest.mark.parametrize("item", ["generation.stop=[<|end|>, <s>, ###", "generation.max_new_tokens=8 # tokens", "generation.stop=[a] b"])
def test_validate_and_run_refuse_alike(tmp_path, capsys, no_model, item):
    job = make_job(tmp_path, write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "instruction": "x"}]))
    messages = []
    for command in (["validate"], ["run", "--no-progress"]):
        assert main([command[0], str(job), *command[1:], item]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"komt-batch: error: {job}: "), err
        messages.append(err[0])
    assert messages[0] == messages[1] and messages[0].endswith(f"(set on the command line: {item})")
    assert not (tmp_path / "out").exists()


def test_the_model_cards_template_and_stop_words_work_on_the_command_line(tmp_path, capsys):
    """The README's defaults written on the command line give the output the job file gives: the same
    settings recorded, the same responses; validate says valid with them."""
    rows = [{"id": f"r{i}", "instruction": q} for i, q in enumerate(["한국의 수도는?", "Say ### twice", "1+1은?"])]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    in_file = make_job(tmp_path / "a", src, prompt={"template": MODEL_CARD_TEMPLATE},
                       generation={"max_new_tokens": 24, "do_sample": False, "stop": ["<|end|>", "<s>", "###"]})
    on_line = make_job(tmp_path / "b", src, generation={"max_new_tokens": 24, "do_sample": False, "stop": ["unused"]})
    on_line.write_text(on_line.read_text().replace("  stop:\n  - unused\n", ""))
    overrides = [f"prompt.template={MODEL_CARD_TEMPLATE}", "generation.stop=[<|end|>, <s>, ###]"]
    assert main(["validate", str(on_line), *overrides]) == 0
    assert capsys.readouterr().out.splitlines()[-1].split() == ["state", "valid"]
    assert main(["run", str(in_file), "--no-progress"]) == 0
    assert main(["run", str(on_line), "--no-progress", *overrides]) == 0
    a, b = (pq.read_table(p / "out" / "result.parquet") for p in (tmp_path / "a", tmp_path / "b"))
    meta = [json.loads(t.schema.metadata[b"komt_batch"]) for t in (a, b)]
    assert [m["generation"]["stop"] for m in meta] == [["<|end|>", "<s>", "###"]] * 2
    assert [m["template"] for m in meta] == [MODEL_CARD_TEMPLATE] * 2
    assert b.select(["id", "response", "finish_reason", "completion_tokens"]).to_pylist() == \
        a.select(["id", "response", "finish_reason", "completion_tokens"]).to_pylist()
    # "###" alone is the model card's one stop word
    assert load_job(on_line, ["generation.stop=###"]).generation.stop == ["###"]
