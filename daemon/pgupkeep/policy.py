"""The policy: YAML in, a frozen and typed `Policy` out, or every problem at once.

Each problem carries the file, line, column and key path it is about, so an operator can go
straight to it. A `Policy` only exists once it is valid; the scheduler accepts nothing else.
The model itself lives in policy_model.py and is re-exported here.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from pgupkeep.policy_model import (
    JOB_KINDS,
    BloatSection,
    DaemonPolicy,
    HealthSection,
    LongRunningQueriesSection,
    MaterializedViewsSection,
    PartitionsSection,
    PartitionTable,
    Policy,
    QueryInsightsSection,
    SessionSettings,
    Target,
    ViewPolicy,
)
from pgupkeep.policy_types import parse_interval
from pgupkeep.units import QualifiedName, parse_duration, parse_qualified_name, parse_retention

__all__ = [
    "JOB_KINDS",
    "BloatSection",
    "DaemonPolicy",
    "HealthSection",
    "LongRunningQueriesSection",
    "MaterializedViewsSection",
    "PartitionTable",
    "PartitionsSection",
    "Policy",
    "PolicyError",
    "Problem",
    "QueryInsightsSection",
    "SessionSettings",
    "Target",
    "ViewPolicy",
    "load_policy",
    "parse_policy",
    "policy_schema",
]


@dataclass(frozen=True)
class Problem:
    file: str
    line: int
    column: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.column}"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class PolicyError(Exception):
    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


Path_ = tuple[str | int, ...]
_VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


_PLAIN_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")


def _format_path(path: Path_) -> str:
    out = ""
    for part in path:
        if not isinstance(part, int) and not _PLAIN_KEY_RE.match(str(part)):
            # A key of blanks or with a line break would be invisible or split the one-problem-a-line
            # output: show it quoted and escaped.
            part = json.dumps(str(part), ensure_ascii=False)
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


class _Reader:
    """Builds plain Python values from a YAML node tree, remembering where each key stood."""

    def __init__(self, file: str, environ: Mapping[str, str]):
        self.file = file
        self.environ = environ
        self.marks: dict[Path_, tuple[int, int]] = {}
        self.problems: list[Problem] = []

    def problem(self, path: Path_, message: str) -> None:
        line, col = self.where(path)
        self.problems.append(Problem(self.file, line, col, _format_path(path), message))

    def where(self, path: Path_) -> tuple[int, int]:
        while path not in self.marks and path:
            path = path[:-1]
        return self.marks.get(path, (1, 1))

    def expand(self, text: str, path: Path_) -> str:
        def substitute(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            value = self.environ.get(name)
            if value is None or (value == "" and default is not None):
                if default is None:
                    self.problem(path, f"environment variable {name} is not set (write ${{{name}:-default}} to give a default)")
                    return ""
                return default
            return value

        return _VAR_RE.sub(substitute, text)

    def build(self, node: yaml.Node, path: Path_, loader: yaml.SafeLoader) -> Any:
        self.marks.setdefault(path, (node.start_mark.line + 1, node.start_mark.column + 1))
        if isinstance(node, yaml.MappingNode):
            out: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                key = loader.construct_object(key_node, deep=True)
                if not isinstance(key, str):
                    key = str(key)
                child = (*path, key)
                self.marks[child] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
                if key in out:
                    self.problem(child, "duplicate key")
                    continue
                out[key] = self.build(value_node, child, loader)
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, (*path, i), loader) for i, item in enumerate(node.value)]
        value = loader.construct_object(node, deep=True)
        if isinstance(value, str):
            value = self.expand(value, path)
        return value


def _message(error: Mapping[str, Any]) -> str:
    kind, msg = error["type"], error["msg"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "is required"
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if kind == "literal_error":
        msg = "must be one of " + msg.removeprefix("Input should be ").replace("'", "")
    if kind == "string_pattern_mismatch":
        if "a-z0-9_-" in str(error.get("ctx", {}).get("pattern", "")):
            return "must be 1 to 63 characters of a-z, 0-9, _ and -"
        return "must match " + str(error.get("ctx", {}).get("pattern", "the allowed pattern"))
    return msg[0].lower() + msg[1:] if msg else msg


def _merge_defaults(policy: Policy) -> Policy:
    targets = []
    for target in policy.targets:
        fill = {
            key: getattr(policy.defaults, key)
            for key in SessionSettings.model_fields
            if getattr(target, key) is None
        }
        targets.append(target.model_copy(update=fill))
    return policy.model_copy(update={"targets": tuple(targets)})


def _items(raw: Any, *keys: str) -> list[tuple[int, Any]]:
    """Enumerate a list found under nested keys of the raw document, tolerating any shape."""
    node = raw
    for key in keys:
        node = node.get(key) if isinstance(node, dict) else None
    return list(enumerate(node)) if isinstance(node, list) else []


def _try(parse: Any, value: Any) -> Any:
    try:
        return parse(value)
    except (ValueError, TypeError):
        return None


def _cross_checks(raw: dict[str, Any], reader: _Reader) -> None:
    """Checks that span several keys; run on the raw document so they add to other problems."""
    seen: dict[Any, int] = {}
    for i, target in _items(raw, "targets"):
        if not isinstance(target, dict):
            continue
        name = target.get("name")
        if isinstance(name, str):
            if name in seen:
                reader.problem(("targets", i, "name"), f"duplicate target name {name!r} (also targets[{seen[name]}])")
            seen.setdefault(name, i)
        tables: dict[QualifiedName, int] = {}
        for j, table in _items(target, "partitions", "tables"):
            if not isinstance(table, dict):
                continue
            path = ("targets", i, "partitions", "tables", j)
            qn = _try(parse_qualified_name, table.get("table"))
            if qn is not None:
                if qn in tables:
                    reader.problem((*path, "table"), f"duplicate table {qn} (also tables[{tables[qn]}])")
                tables.setdefault(qn, j)
            interval = _try(parse_interval, table.get("interval"))
            retention = _try(parse_retention, table.get("retention")) if table.get("retention") is not None else None
            if interval is not None and retention is not None:
                if isinstance(interval, int) and retention.integer is None:
                    reader.problem((*path, "retention"), "integer intervals take an integer retention (a number of key values)")
                if isinstance(interval, str) and retention.integer is not None:
                    reader.problem((*path, "retention"), "time intervals take a time retention such as 90 days or 24 months")
        views: dict[QualifiedName, int] = {}
        for j, view in _items(target, "materialized_views", "views"):
            qn = _try(parse_qualified_name, view.get("view")) if isinstance(view, dict) else None
            if qn is not None:
                if qn in views:
                    reader.problem(
                        ("targets", i, "materialized_views", "views", j, "view"), f"duplicate view {qn} (also views[{views[qn]}])"
                    )
                views.setdefault(qn, j)
        lrq = target.get("long_running_queries")
        if isinstance(lrq, dict) and lrq.get("cancel_after") is not None and lrq.get("terminate_after") is not None:
            cancel, terminate = _try(parse_duration, lrq["cancel_after"]), _try(parse_duration, lrq["terminate_after"])
            if cancel is not None and terminate is not None and terminate < cancel:
                reader.problem(
                    ("targets", i, "long_running_queries", "terminate_after"),
                    "must not be shorter than cancel_after (a session is cancelled before it is terminated)",
                )


def parse_policy(text: str, file: str = "<policy>", environ: Mapping[str, str] | None = None) -> Policy:
    """Parse and validate a policy; raise PolicyError listing every problem."""
    reader = _Reader(file, os.environ if environ is None else environ)
    try:
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            raw = reader.build(node, (), loader) if node is not None else None
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        problem = exc.problem or str(exc)
        raise PolicyError([Problem(file, line, col, "", f"not valid YAML: {problem}")]) from None
    except yaml.YAMLError as exc:
        raise PolicyError([Problem(file, 1, 1, "", f"not valid YAML: {exc}")]) from None
    except (ValueError, TypeError, RecursionError) as exc:
        raise PolicyError([Problem(file, 1, 1, "", f"not a policy: {exc}")]) from None
    if raw is None:
        raise PolicyError([Problem(file, 1, 1, "", "the policy is empty; it needs at least `version: 1`")])
    if not isinstance(raw, dict):
        raise PolicyError([Problem(file, 1, 1, "", "the policy must be a mapping with `version: 1` at the top")])
    policy = None
    expanded = {p.path for p in reader.problems}
    try:
        policy = Policy.model_validate(raw)
    except ValidationError as exc:
        for error in exc.errors():
            path = tuple(p for p in error["loc"] if isinstance(p, (str, int)))
            if _format_path(path) not in expanded:  # an unset ${VAR} already said why
                reader.problem(path, _message(error))
    _cross_checks(raw, reader)
    if reader.problems:
        unique = list(dict.fromkeys(reader.problems))
        unique.sort(key=lambda p: (p.line, p.column))
        raise PolicyError(unique)
    assert policy is not None
    return _merge_defaults(policy)


def load_policy(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Policy:
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError([Problem(str(file), 1, 1, "", f"cannot read the policy: {exc.strerror}")]) from None
    except UnicodeDecodeError:
        raise PolicyError([Problem(str(file), 1, 1, "", "the policy is not UTF-8 text")]) from None
    return parse_policy(text, str(file), environ)


def policy_schema() -> dict[str, Any]:
    schema = Policy.model_json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "pgupkeep policy"
    return schema
