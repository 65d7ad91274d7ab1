"""The policy: YAML in, a frozen and typed `Policy` out, or every problem at once.

Each problem carries the file, line, column and key path it is about, so an operator can go
straight to it. A `Policy` only exists once it is valid; the scheduler accepts nothing else.
The model itself lives in policy_model.py and is re-exported here.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ValidationError

from pgupkeep.policy_model import (
    JOB_KINDS,
    BloatSection,
    DaemonPolicy,
    HealthSection,
    HistoryPolicy,
    LongRunningQueriesSection,
    MaterializedViewsSection,
    PartitionsSection,
    PartitionTable,
    Policy,
    QueryInsightsSection,
    SessionSettings,
    SqlJob,
    SqlSection,
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
    "HistoryPolicy",
    "LongRunningQueriesSection",
    "MaterializedViewsSection",
    "PartitionTable",
    "PartitionsSection",
    "Policy",
    "PolicyError",
    "Problem",
    "QueryInsightsSection",
    "SessionSettings",
    "SqlJob",
    "SqlSection",
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


# An alias makes its anchor's whole subtree appear again: nested aliases multiply (a 325-byte
# "billion laughs" expands to a million nodes). Expansion through aliases is capped at this many
# nodes, or ALIAS_RATIO times the document's own nodes when that is more: ordinary anchors (a
# section shared by every target) stay far below it.
ALIAS_BUDGET = 10_000
ALIAS_RATIO = 10


class _AliasBomb(Exception):
    def __init__(self, node: yaml.Node, path: Path_, recursive: bool):
        self.node = node
        self.path = path
        self.recursive = recursive


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _sizes(root: yaml.Node, cap: int) -> tuple[int, int, bool]:
    """(distinct nodes, nodes once every alias is expanded capped at `cap` + 1, recursive?).

    Linear in the distinct nodes: each node's expanded size is computed once. A recursive alias
    (an anchor used inside itself) expands forever and counts as over the cap.
    """
    expanded: dict[int, int] = {}
    active: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            active.discard(key)
            expanded[key] = min(cap + 1, 1 + sum(expanded[id(c)] for c in _children(node)))
            continue
        if key in expanded:
            continue
        if key in active:
            return len(expanded), cap + 1, True
        active.add(key)
        stack.append((node, True))
        stack += [(c, False) for c in _children(node) if id(c) not in expanded]
    return len(expanded), expanded[id(root)], False


class _Reader:
    """Builds plain Python values from a YAML node tree, remembering where each key stood."""

    def __init__(self, file: str, environ: Mapping[str, str]):
        self.file = file
        self.environ = environ
        self.marks: dict[Path_, tuple[int, int]] = {}
        self.scalars: dict[Path_, yaml.ScalarNode] = {}  # to point inside a value (a SQL text)
        self.problems: list[Problem] = []
        self.budget = self.budget_total = ALIAS_BUDGET  # nodes the build may visit (see ALIAS_BUDGET)

    def problem(self, path: Path_, message: str, at: tuple[int, int] | None = None) -> None:
        line, col = at or self.where(path)
        self.problems.append(Problem(self.file, line, col, _format_path(path), message))

    def inside(self, path: Path_, line: int, column: int) -> tuple[int, int] | None:
        """The file position of (line, column) of a string value, where the value stands in the
        file as written (a plain or quoted one-liner without escapes, or a literal block)."""
        node = self.scalars.get(path)
        if node is None or node.start_mark.buffer is None:
            return None
        source, value = node.start_mark.buffer, str(node.value)
        start, end = node.start_mark, node.end_mark
        if node.style in (None, "'", '"') and start.line == end.line and line == 1:
            quote = 0 if node.style is None else 1
            if source[start.index + quote : end.index - quote] == value:
                return start.line + 1, start.column + quote + column
            return None
        if node.style == "|":
            lines = source[start.index : end.index].split("\n")[1:]  # after the `|` indicator line
            if line > len(lines):
                return None
            wanted = value.split("\n")[line - 1]
            indent = len(lines[line - 1]) - len(wanted)
            if indent >= 0 and lines[line - 1][indent:] == wanted:
                return start.line + 1 + line, indent + column
        return None

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
        self.budget -= 1
        if self.budget < 0:
            raise _AliasBomb(node, path, False)
        self.marks.setdefault(path, (node.start_mark.line + 1, node.start_mark.column + 1))
        if isinstance(node, yaml.ScalarNode):
            self.scalars[path] = node
        if isinstance(node, yaml.MappingNode):
            out: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    # A list or mapping as a key is no key of a policy (and printing one built
                    # from aliases could take as long as a bomb).
                    mark = key_node.start_mark
                    self.problems.append(
                        Problem(self.file, mark.line + 1, mark.column + 1, _format_path(path),
                                "a key must be plain text, not a list or mapping")
                    )  # fmt: skip
                    continue
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


def _model_at(path: Path_) -> type[BaseModel] | None:
    """The policy model class found at a key path (the one an unknown key was written into)."""
    model: Any = Policy
    for part in path:
        if isinstance(part, int):
            continue  # an element of a tuple: its type was unwrapped with the tuple's field
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return None
        model = _unwrap(field.annotation)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _unwrap(annotation: Any) -> Any:
    """The model inside `X | None` and `tuple[X, ...]`."""
    for arg in (*get_args(annotation), annotation):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
        inner = [a for a in get_args(arg) if isinstance(a, type) and issubclass(a, BaseModel)]
        if inner:
            return inner[0]
    return annotation


def _unknown_key(path: Path_) -> str:
    model = _model_at(path[:-1])
    key = path[-1] if path else None
    if model is None or not isinstance(key, str):
        return "unknown key"
    close = difflib.get_close_matches(key.lower(), list(model.model_fields), n=1, cutoff=0.6)
    return f"unknown key; did you mean {close[0]}?" if close else "unknown key"


def _message(error: Mapping[str, Any], path: Path_ = ()) -> str:
    kind, msg = error["type"], error["msg"]
    if kind == "extra_forbidden":
        return _unknown_key(path)
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
        if target.log_query_text is None:
            fill["log_query_text"] = policy.daemon.log_query_text
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
        names: dict[Any, int] = {}
        for j, job in _items(target, "sql", "jobs"):
            name = job.get("name") if isinstance(job, dict) else None
            if isinstance(name, str):
                if name in names:
                    reader.problem(("targets", i, "sql", "jobs", j, "name"), f"duplicate name {name!r} (also jobs[{names[name]}])")
                names.setdefault(name, j)
        lrq = target.get("long_running_queries")
        if isinstance(lrq, dict) and lrq.get("cancel_after") is not None and lrq.get("terminate_after") is not None:
            cancel, terminate = _try(parse_duration, lrq["cancel_after"]), _try(parse_duration, lrq["terminate_after"])
            if cancel is not None and terminate is not None and terminate < cancel:
                reader.problem(
                    ("targets", i, "long_running_queries", "terminate_after"),
                    "must not be shorter than cancel_after (a session is cancelled before it is terminated)",
                )


def _check_aliases(root: yaml.Node, reader: _Reader) -> None:
    """Refuse a document whose aliases expand it beyond the budget, before building any of it."""
    distinct, size, recursive = _sizes(root, 1 << 62)
    reader.budget = reader.budget_total = max(ALIAS_BUDGET, ALIAS_RATIO * distinct)
    if size <= reader.budget:
        return
    # Name the top-level key whose value explodes: that is where to look.
    for key, value in root.value if isinstance(root, yaml.MappingNode) else ():
        _, size, recursive = _sizes(value, reader.budget)
        if (recursive or size > reader.budget // 2) and isinstance(key, yaml.ScalarNode):
            raise _AliasBomb(key, (str(key.value),), recursive)
    raise _AliasBomb(root, (), recursive)


def parse_policy(text: str, file: str = "<policy>", environ: Mapping[str, str] | None = None) -> Policy:
    """Parse and validate a policy; raise PolicyError listing every problem."""
    reader = _Reader(file, os.environ if environ is None else environ)
    try:
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            if node is not None:
                _check_aliases(node, reader)
            raw = reader.build(node, (), loader) if node is not None else None
        finally:
            loader.dispose()
    except _AliasBomb as bomb:
        line, col = bomb.node.start_mark.line + 1, bomb.node.start_mark.column + 1
        message = (
            "an alias is used inside its own anchor: the value never ends"
            if bomb.recursive
            else f"aliases expand the document beyond {reader.budget_total} nodes (nested aliases, "
            'a "billion laughs"?); write the repeated parts out or use fewer levels of aliases'
        )
        raise PolicyError([Problem(file, line, col, _format_path(bomb.path), message)]) from None
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
                ctx = error.get("ctx") or {}
                at = reader.inside(path, ctx["line"], ctx["column"]) if error["type"] == "sql_text" else None
                reader.problem(path, _message(error, path), at)
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
