import pytest

from batch.config import blame_overrides, load_job
from batch.errors import JobError

BASE = """
model:
  base: models/tiny-komt/base
input:
  path: data/demo_prompts.jsonl
output:
  path: out/x.parquet
"""


def write(tmp_path, text):
    p = tmp_path / "job.yaml"
    p.write_text(text)
    return p


def test_defaults_are_the_model_card_settings(tmp_path):
    job = load_job(write(tmp_path, BASE))
    g = job.generation
    assert (g.do_sample, g.temperature, g.top_p, g.top_k) == (True, 0.9, 0.7, 100)
    assert g.stop == ["<|end|>", "<s>", "###"]
    assert job.model.quantization == "nf4" and job.model.compute_dtype == "bfloat16"
    assert job.prompt.template == "### instruction: {instruction}\n\n### Response:"
    assert str(job.parts_dir) == "out/x.parquet.parts"


def test_overrides_are_yaml_scalars(tmp_path):
    job = load_job(
        write(tmp_path, BASE),
        ["generation.max_new_tokens=64", "generation.do_sample=false", "output.path=out/try.parquet", "generation.stop=[a, b]", "model.adapter=null"],
    )
    assert job.generation.max_new_tokens == 64 and job.generation.do_sample is False
    assert job.output.path == "out/try.parquet" and job.generation.stop == ["a", "b"]
    assert job.model.adapter is None


@pytest.mark.parametrize(
    "extra, overrides, fragment",
    [
        ("generation:\n  max_new_token: 5\n", [], "unknown key generation.max_new_token; did you mean generation.max_new_tokens?"),
        ("modle:\n  base: x\n", [], "unknown key modle; did you mean model?"),
        ("generation:\n  max_new_tokens: lots\n", [], "generation.max_new_tokens: expected an integer, got str 'lots'"),
        ("", ["generation.max_new_tokens=-1"], "generation.max_new_tokens: must be >= 1"),
        ("", ["generation.top_p=1.5"], "generation.top_p: must be in (0, 1]"),
        ("", ["generation.temperature=.nan"], "generation.temperature: must be a number > 0, got nan"),
        ("", ["generation.temperature=.inf"], "generation.temperature: must be a number > 0, got inf"),
        ("", ["generation.temperature=0"], "generation.temperature: must be a number > 0, got 0"),
        ("", ["checkpoint.every_seconds=.nan"], "checkpoint.every_seconds: must be > 0, got nan"),
        ("", ["model.quantization=fp4"], "model.quantization: must be one of nf4, int8, none"),
        ("", ["generation.do_sample=maybe"], "generation.do_sample: expected true/false"),
        ("", ["nonsense"], "expected dotted.key=value"),
        ("batching: 3\n", [], "batching: expected a mapping, got int 3"),
        ("generation:\n  stop_token_ids: yes\n", [], "generation.stop_token_ids: expected a list of integers, got bool yes"),
        ("", ["model.merge_adapter=true"], "model.merge_adapter: needs model.adapter"),
        ("", ["model.merge_adapter=true", "model.adapter=a", "model.weights=nf4"], "model.merge_adapter: the adapter merges into dequantized weights; set model.weights to dequantized or auto"),
        ("", ["model.merge_adapter=true", "model.adapter=a", "model.quantization=int8"], "model.merge_adapter: not with quantization int8"),
        ("", ["generation.min_new_tokens=-1"], "generation.min_new_tokens: must be >= 0, got -1"),
        ("", ["generation.min_new_tokens=600"], "generation.min_new_tokens: must be <= generation.max_new_tokens (512), got 600"),
        ("", ["generation.repetition_penalty=0"], "generation.repetition_penalty: must be a number > 0, got 0"),
        ("", ["generation.repetition_penalty=.nan"], "generation.repetition_penalty: must be a number > 0, got nan"),
        ("generation:\n  stop_token_ids: [2, x]\n", [], "generation.stop_token_ids: expected a list of integers, got str 'x' as item 2"),
        ("generation:\n  stop_token_ids: [13, \"2\"]\n", [], "generation.stop_token_ids: expected a list of integers, got str '2' as item 2"),
        ("generation:\n  stop_token_ids: [true]\n", [], "generation.stop_token_ids: expected a list of integers, got bool true as item 1"),
        ("", ["generation.stop_token_ids=[1, 2.5]"], "generation.stop_token_ids: expected a list of integers, got float 2.5 as item 2"),
        ("generation:\n  stop: null\n", [], "generation.stop: expected a list of strings, got nothing; [] for none"),
        ("generation:\n  max_new_tokens: 5\n  max_new_tokens: 7\n", [], "YAML at line 10: 'max_new_tokens' is written twice in one mapping (first at line 9); one value would be lost"),
        ("generation:\n  top_k: 5\ngeneration:\n  top_p: 0.5\n", [], "YAML at line 10: 'generation' is written twice in one mapping (first at line 8)"),
        ("", ["generation.stop_token_ids=-3"], "generation.stop_token_ids: token ids must be >= 0, got [-3]"),
        ("", ["generation.include_stop_str_in_output=sometimes"], "generation.include_stop_str_in_output: expected true/false"),
    ],
)
def test_errors_name_file_and_field(tmp_path, extra, overrides, fragment):
    p = write(tmp_path, BASE + extra)
    with pytest.raises(JobError) as e:
        load_job(p, overrides)
    assert fragment in str(e.value)
    if not overrides:
        assert str(p) in str(e.value)


def test_a_text_setting_given_on_the_command_line_is_taken_as_written(tmp_path):
    p = write(tmp_path, BASE)
    for text in ("010", "0x1F", "1:30", "1e3", "12"):  # YAML would read 8, 31, 90, 1000.0, 12
        job = load_job(p, [f"output.response_column={text}", "generation.max_new_tokens=0x10", "generation.top_p=.5"])
        assert job.output.response_column == text
        assert (job.generation.max_new_tokens, job.generation.top_p) == (16, 0.5)  # numbers stay YAML's numbers
        assert type(job.generation.max_new_tokens) is int and type(job.generation.top_p) is float


def test_an_error_in_a_value_set_on_the_command_line_says_so(tmp_path):
    p = write(tmp_path, BASE + "generation:\n  max_new_tokens: 8\n")
    cases = {
        "generation.max_new_token=64": "unknown key generation.max_new_token; did you mean generation.max_new_tokens? "
                                       "(set on the command line: generation.max_new_token=64)",
        "generation.max_new_tokens=abc": "generation.max_new_tokens: expected an integer, got str 'abc' "
                                         "(set on the command line: generation.max_new_tokens=abc)",
        "generation.top_k=-1": "generation.top_k: must be >= 0, got -1 (set on the command line: generation.top_k=-1)",
        "nosuch.key=1": "unknown key nosuch; valid keys: model, input, prompt, generation, batching, output, checkpoint, cpu "
                        "(set on the command line: nosuch.key=1)",
    }
    for item, message in cases.items():
        with pytest.raises(JobError) as e:
            load_job(p, ["generation.top_p=0.5", item])
        assert str(e.value) == f"{p}: {message}"
    with pytest.raises(JobError) as e:  # the file's own error: no override named
        load_job(write(tmp_path, BASE + "generation:\n  max_new_tokens: lots\n"), ["generation.top_p=0.5"])
    assert "command line" not in str(e.value)


@pytest.mark.parametrize("message, overrides, blamed", [
    ("j.yaml: generation.top_k: must be >= 0, got -1", ["generation.top_p=0.5", "generation.top_k=-1"], "generation.top_k=-1"),
    ("j.yaml: model.adapter: a does not fit model.base (x)", ["model.adapter=a", "model.base=b"], "model.adapter=a"),  # the message's own key
    ("j.yaml: model.base: x: no such directory", ["model={base: m}"], "model={base: m}"),  # a whole section set
    ("j.yaml: unknown key nosuch; valid keys: model", ["nosuch.key=1"], "nosuch.key=1"),
    ("j.yaml: unknown key model.bse; did you mean model.base?", ["model={bse: m}"], "model={bse: m}"),
    # not about the key an override sets: a word, a path or a column that only looks like it
    ("j.yaml: input.path: data/model/in.jsonl: no such file", ["model={base: m}"], None),
    ("j.yaml: output: the input already has a column 'input', one the output adds; rename it in the input", ["input={path: a.jsonl}"], None),
    ("/x/checkpoint: the checkpoint is damaged", ["checkpoint={every_rows: 4}"], None),
    ("override 'generation': expected dotted.key=value", ["generation"], None),  # (the override's own form: not a setting)
    ("--date: expected a date as YYYY-MM-DD", ["=5"], None),
])
def test_an_error_names_the_override_that_set_its_key_and_no_other(message, overrides, blamed):
    assert blame_overrides(message, overrides) == message + (f" (set on the command line: {blamed})" if blamed else "")


def test_yaml_syntax_error_has_line(tmp_path):
    p = write(tmp_path, BASE + "generation:\n  stop: [a, b\n")
    with pytest.raises(JobError, match=r"YAML syntax error at line \d+"):
        load_job(p)


def test_missing_job_file(tmp_path):
    with pytest.raises(JobError, match="job file not found"):
        load_job(tmp_path / "nope.yaml")


def test_placeholders_filled_in_paths(tmp_path):
    p = write(tmp_path, BASE.replace("out/x.parquet", "out/{date}/x-{job_id}.parquet"))
    job = load_job(p, fill={"date": "2026-11-27", "time": "020000", "job_id": "77"})
    assert job.output.path == "out/2026-11-27/x-77.parquet"
    with pytest.raises(JobError, match="bad placeholder"):
        load_job(write(tmp_path, BASE.replace("out/x.parquet", "out/{when}.parquet")), fill={"date": "d", "time": "t", "job_id": "j"})


def test_home_is_expanded_in_every_path(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", "/home/me")
    overrides = [
        "input.path=~/in.jsonl",
        "output.path=~/out/{date}.parquet",
        "checkpoint.dir=~/parts",
        "input.reuse=~/old/*.parquet",
        "model.base=~/models/base",
        "model.adapter=~/models/adapter",
    ]
    job = load_job(write(tmp_path, BASE), overrides, fill={"date": "2026-11-27", "time": "020000", "job_id": "7"})
    assert [job.input.path, job.output.path, str(job.parts_dir), job.input.reuse, job.model.base, job.model.adapter] == [
        "/home/me/in.jsonl",
        "/home/me/out/2026-11-27.parquet",
        "/home/me/parts",
        "/home/me/old/*.parquet",
        "/home/me/models/base",
        "/home/me/models/adapter",
    ]
    job = load_job(write(tmp_path, BASE), ["output.path=out/~x/a.parquet", "model.base=davidkim205/komt-Llama-2-7b-chat-hf"])
    assert (job.output.path, job.model.base) == ("out/~x/a.parquet", "davidkim205/komt-Llama-2-7b-chat-hf")
    with pytest.raises(JobError, match=r"input.path: cannot expand '~nobody-komt' in '~nobody-komt/in.jsonl'"):
        load_job(write(tmp_path, BASE), ["input.path=~nobody-komt/in.jsonl"])


def test_generation_options_from_the_job_file_and_the_command_line(tmp_path):
    """stop_token_ids, min_new_tokens, repetition_penalty, include_stop_str_in_output: the same value
    means the same in the job file and as an override; one token id alone is a list of one."""
    text = BASE + "generation:\n  stop_token_ids: [13, 2]\n  min_new_tokens: 3\n  repetition_penalty: 1.2\n  include_stop_str_in_output: true\n"
    from_file = load_job(write(tmp_path, text)).generation
    overridden = load_job(write(tmp_path, BASE), ["generation.stop_token_ids=[13, 2]", "generation.min_new_tokens=3",
                                                  "generation.repetition_penalty=1.2", "generation.include_stop_str_in_output=true"]).generation
    assert from_file == overridden
    assert (from_file.stop_token_ids, from_file.min_new_tokens, from_file.repetition_penalty, from_file.include_stop_str_in_output) == ([13, 2], 3, 1.2, True)
    assert load_job(write(tmp_path, BASE), ["generation.stop_token_ids=13"]).generation.stop_token_ids == [13]
    defaults = load_job(write(tmp_path, BASE)).generation
    assert (defaults.stop_token_ids, defaults.min_new_tokens, defaults.repetition_penalty, defaults.include_stop_str_in_output) == ([], 0, 1.0, False)
