import pytest

from batch.errors import JobError
from batch.template import Template

KOMT = "### instruction: {instruction}\n\n### Response:"


def test_render_komt_template():
    t = Template.parse(KOMT)
    assert t.fields == ("instruction",)
    assert t.render({"instruction": "안녕?", "other": 1}) == "### instruction: 안녕?\n\n### Response:"


def test_multi_field_template_and_literal_braces():
    t = Template.parse("### instruction: {instruction}\n\n### input: {input}\n\n{{json}} ### Response:")
    assert t.fields == ("instruction", "input")
    assert t.render({"instruction": "a", "input": "b"}).endswith("{json} ### Response:")


@pytest.mark.parametrize("bad", ["{", "{0}", "{a.b}", "{x!r}", "{x:>10}", "no fields", "{}"])
def test_bad_placeholders(bad):
    with pytest.raises(JobError, match="prompt.template"):
        Template.parse(bad, "job.yaml")


@pytest.mark.parametrize("value, message", [(None, "null"), ("", "empty"), ("  ", "empty"), (3, "int")])
def test_bad_field_values_are_row_errors(value, message):
    with pytest.raises(ValueError, match=message):
        Template.parse(KOMT).render({"instruction": value})


def test_missing_column_names_the_column():
    with pytest.raises(JobError, match="'instruction' is not in the input"):
        Template.parse(KOMT).check_columns(["id", "question"], "job.yaml")
