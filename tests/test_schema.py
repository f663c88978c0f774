"""`fed-deq schema`: the JSON Schema editors check scenario files against."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from fed_deq.scenario import dump_scenario, load_scenario, parse_scenario
from tests.conftest import TINY_SCENARIO
from tools.cli import main

SHIPPED = sorted((Path(__file__).resolve().parent.parent / "scenarios").glob("*.yaml"))


@pytest.fixture
def printed_schema(capsys) -> dict:
    """What ``fed-deq schema`` prints."""
    assert main(["schema"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture
def validator(printed_schema) -> jsonschema.protocols.Validator:
    """A validator for the printed schema, in the dialect it names (itself checked against that dialect)."""
    cls = jsonschema.validators.validator_for(printed_schema)
    cls.check_schema(printed_schema)
    return cls(printed_schema)


def test_the_schema_names_its_dialect_and_what_it_describes(printed_schema):
    assert printed_schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert printed_schema["title"] == "fed-deq scenario"
    assert printed_schema["additionalProperties"] is False
    assert set(printed_schema["properties"]) == {"seed", "dataset", "model", "fleet", "training", "fusion",
                                                  "simulation", "evaluation", "adversaries"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_scenarios_and_their_resolved_dumps_validate(validator, path):
    validator.validate(yaml.safe_load(path.read_text(encoding="utf-8")))
    validator.validate(yaml.safe_load(dump_scenario(load_scenario(path))))  # what a run writes as scenario.yaml


def test_the_test_fixture_scenario_validates(validator):
    validator.validate(yaml.safe_load(TINY_SCENARIO))


@pytest.mark.parametrize("text", ["model:\n", "adversaries:\n", "seed: 3\nfleet:\n"])
def test_an_empty_section_means_defaults_to_the_schema_as_to_the_parser(validator, text):
    data = yaml.safe_load(text)
    parse_scenario(data, "empty-section.yaml")
    validator.validate(data)


def _messages(errors) -> list[str]:
    """Every message of the errors and of what they wrap (a section may also be null, so errors nest)."""
    return [m for e in errors for m in (e.message, *_messages(e.context or []))]


@pytest.mark.parametrize("change, where", [
    ({"training": {"rounds": 3, "roundz": 4}}, "roundz"),                 # unknown key
    ({"rounds": 3}, "rounds"),                                            # key in the wrong section
    ({"training": {"rounds": "ten"}}, "ten"),                             # wrong type
    ({"training": {"rounds": 0}}, "0"),                                   # out of range
    ({"model": {"solver": "andersen"}}, "andersen"),                      # not a registered solver
    ({"fleet": {"tiers": [{"count": 3}]}}, "name"),                       # a tier without its name
])
def test_bad_files_fail_the_schema(validator, change, where):
    errors = list(validator.iter_errors(change))
    assert errors
    assert any(where in message for message in _messages(errors))


def test_schema_out_writes_the_same_schema(tmp_path, printed_schema):
    out = tmp_path / "scenario.schema.json"
    assert main(["schema", "--out", str(out)]) == 0
    assert json.loads(out.read_text(encoding="utf-8")) == printed_schema
