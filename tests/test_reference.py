"""The checked-in schema and configuration reference are generated from the model and current."""

from pathlib import Path

from pgupkeep import reference
from pgupkeep.policy import Policy

REPO = Path(__file__).resolve().parent.parent
REGENERATE = "run `python -m pgupkeep.reference` and commit the result"


def test_schema_file_is_up_to_date():
    assert (REPO / "config" / "policy.schema.json").read_text() == reference.schema_text(), REGENERATE


def test_configuration_reference_is_up_to_date():
    assert (REPO / "docs" / "configuration.md").read_text() == reference.markdown(), REGENERATE


def test_every_key_of_the_model_is_documented_in_the_example_policy():
    example = (REPO / "config" / "policy.yaml").read_text()
    missing = [
        f"{model.__name__}.{name}"
        for _, model in reference.SECTIONS
        for name in model.model_fields
        if f"{name}:" not in example
    ]
    missing += [f"Policy.{name}" for name in Policy.model_fields if f"{name}:" not in example]
    assert missing == []


def test_every_field_has_a_description():
    undocumented = [
        f"{model.__name__}.{name}"
        for _, model in reference.SECTIONS
        for name, field in model.model_fields.items()
        if not field.description
    ]
    assert undocumented == []
