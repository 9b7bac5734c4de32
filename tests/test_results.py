"""Result documents: the schema a document is checked against comes from a fixed table."""

import json

import pytest

from nnobs.core.errors import NnobsError
from nnobs.core.results import SCHEMA_FILES, load_result, schema_for, schema_version, validate


def test_every_kind_in_the_table_has_its_schema_file():
    for name in SCHEMA_FILES:
        schema = schema_for(name)
        assert schema["$id"] == f"{name}/{schema_version(name)}"
        assert schema["properties"]["schema"] == {"const": name}


@pytest.mark.parametrize(
    "name",
    [
        "../..",
        "../core/schemas/observe",
        "nnobs.observe.schema",
        "observe",
        "",
        7,
        None,
        ["nnobs.observe"],
    ],
)
def test_a_name_outside_the_table_is_refused(name):
    with pytest.raises(NnobsError, match="not an nnobs result: unknown schema"):
        schema_for(name)
    with pytest.raises(NnobsError, match="not an nnobs result: unknown schema"):
        validate({"schema": name, "schema_version": 1})


def test_a_long_schema_value_is_cut_to_one_short_line():
    with pytest.raises(NnobsError) as err:
        validate({"schema": "x" * 10_000 + "\n" + "y", "schema_version": 1})
    assert len(str(err.value)) < 200 and "\n" not in str(err.value)


def test_kind_and_version(tmp_path):
    path = tmp_path / "observe.json"
    path.write_text(json.dumps({"schema": "nnobs.observe", "schema_version": 3}))
    with pytest.raises(NnobsError, match=r"written by a newer nnobs \(nnobs.observe schema 3"):
        load_result(path)
    with pytest.raises(NnobsError, match="holds an nnobs.observe result, not the nnobs.study"):
        load_result(path, "nnobs.study")
    with pytest.raises(NnobsError, match="unknown schema '../..'"):
        load_result(path, "../..")
