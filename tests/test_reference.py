"""The checked-in schema and configuration reference are generated from the model and current."""

from pathlib import Path
from typing import Any, get_args, get_origin

import yaml
from pydantic import BaseModel

from pgupkeep import reference
from pgupkeep.policy import Policy
from pgupkeep.policy_model import SessionSettings, Target

REPO = Path(__file__).resolve().parent.parent
REGENERATE = "run `python -m pgupkeep.reference` and commit the result"


def test_schema_file_is_up_to_date():
    assert (REPO / "config" / "policy.schema.json").read_text() == reference.schema_text(), REGENERATE


def test_configuration_reference_is_up_to_date():
    assert (REPO / "docs" / "configuration.md").read_text() == reference.markdown(), REGENERATE


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    """The model a field holds (directly, optionally, or as the items of a tuple/list), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _nested_model(arg)
        if found is not None:
            return found
    return None


def _is_sequence(annotation: Any) -> bool:
    return get_origin(annotation) in (tuple, list) or any(_is_sequence(a) for a in get_args(annotation))


def _undocumented(model: type[BaseModel], where: str, examples: list[dict], session_defaults: dict) -> list[str]:
    """Keys of `model` that none of `examples` (its occurrences in the example policy) sets.

    A key of a list item (a target, a table, a view) counts when any item sets it. A target's
    session settings are documented once, under `defaults`, with a comment that targets may
    override them.
    """
    missing = []
    for name, field in model.model_fields.items():
        values = [example[name] for example in examples if name in example]
        if not values and not (model is Target and name in SessionSettings.model_fields and name in session_defaults):
            missing.append(f"{where}.{name}")
        nested = _nested_model(field.annotation)
        if nested is None:
            continue
        children: list[dict] = []
        for value in values:
            children += value if isinstance(value, list) else [value]
        assert all(isinstance(c, dict) for c in children), f"{where}.{name} is not a mapping (or list of them)"
        suffix = "[]" if _is_sequence(field.annotation) else ""
        missing += _undocumented(nested, f"{where}.{name}{suffix}", children, session_defaults)
    return missing


def test_every_key_of_the_model_is_documented_in_the_example_policy():
    example = yaml.safe_load((REPO / "config" / "policy.yaml").read_text())
    assert isinstance(example, dict)
    # Each key must appear in its own section, not merely as text somewhere in the file
    # (`lock_timeout:` must not stand in for a view's `timeout:`).
    missing = _undocumented(Policy, "policy", [example], example.get("defaults") or {})
    assert missing == []
    # The walk covers every section the reference documents.
    walked = {model for _, model in reference.SECTIONS}
    assert walked <= _models(Policy)


def _models(model: type[BaseModel]) -> set[type[BaseModel]]:
    found = set()
    for field in model.model_fields.values():
        nested = _nested_model(field.annotation)
        if nested is not None and nested not in found:
            found |= {nested} | _models(nested)
    return found


def test_every_field_has_a_description():
    undocumented = [
        f"{model.__name__}.{name}"
        for _, model in reference.SECTIONS
        for name, field in model.model_fields.items()
        if not field.description
    ]
    assert undocumented == []
