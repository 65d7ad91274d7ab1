"""Table storage parameters (reloptions): the names PostgreSQL accepts for a plain table, their
types and ranges and the first version that knows them, and how a value is written in SQL.

The table is PostgreSQL's own (src/backend/access/common/reloptions.c, heap and toast kinds);
tests/test_partitions_storage.py proves every bound against a real server.
"""

from __future__ import annotations

from dataclasses import dataclass

INT_MAX = 2**31 - 1


@dataclass(frozen=True)
class Reloption:
    name: str  # as written in WITH (...), e.g. "fillfactor" or "toast.autovacuum_enabled"
    kind: str  # "int" | "real" | "bool" | "enum"
    lo: float | None = None
    hi: float | None = None
    since: int = 0  # server_version_num that first accepts it (0: every supported version)
    meaning: str = ""


# (name, kind, lo, hi, since, meaning) of the options both the table and its TOAST table take.
_SHARED = [
    ("autovacuum_enabled", "bool", None, None, 0, "Autovacuum runs on the table."),
    ("vacuum_index_cleanup", "enum", None, None, 0, "auto, on or off: VACUUM cleans the indexes."),
    ("vacuum_truncate", "bool", None, None, 0, "VACUUM truncates empty pages at the end."),
    ("autovacuum_vacuum_threshold", "int", 0, INT_MAX, 0, "Dead tuples before autovacuum vacuums."),
    ("autovacuum_vacuum_max_threshold", "int", -1, INT_MAX, 180000, "Cap of the dead-tuple threshold (PostgreSQL 18+)."),
    ("autovacuum_vacuum_insert_threshold", "int", -1, INT_MAX, 0, "Inserted tuples before autovacuum vacuums."),
    ("autovacuum_vacuum_cost_limit", "int", 1, 10000, 0, "Autovacuum cost limit."),
    ("autovacuum_freeze_min_age", "int", 0, 1_000_000_000, 0, "vacuum_freeze_min_age for the table."),
    ("autovacuum_freeze_max_age", "int", 100_000, 2_000_000_000, 0, "autovacuum_freeze_max_age for the table."),
    ("autovacuum_freeze_table_age", "int", 0, 2_000_000_000, 0, "vacuum_freeze_table_age for the table."),
    ("autovacuum_multixact_freeze_min_age", "int", 0, 1_000_000_000, 0, "vacuum_multixact_freeze_min_age for the table."),
    ("autovacuum_multixact_freeze_max_age", "int", 10_000, 2_000_000_000, 0, "autovacuum_multixact_freeze_max_age for the table."),
    ("autovacuum_multixact_freeze_table_age", "int", 0, 2_000_000_000, 0, "vacuum_multixact_freeze_table_age for the table."),
    ("log_autovacuum_min_duration", "int", -1, INT_MAX, 0, "Log autovacuum runs longer than this many milliseconds."),
    ("autovacuum_vacuum_cost_delay", "real", 0, 100, 0, "Autovacuum cost delay in milliseconds."),
    ("autovacuum_vacuum_scale_factor", "real", 0, 100, 0, "Share of the table's tuples added to the vacuum threshold."),
    ("autovacuum_vacuum_insert_scale_factor", "real", 0, 100, 0, "Share of the table's tuples added to the insert threshold."),
    ("vacuum_max_eager_freeze_failure_rate", "real", 0, 1, 180000, "Eager freezing's failure budget (PostgreSQL 18+)."),
]
_TABLE_ONLY = [
    ("fillfactor", "int", 10, 100, 0, "Percent of each heap page filled by INSERT."),
    ("toast_tuple_target", "int", 128, 8160, 0, "Row size in bytes above which values are compressed or moved to TOAST."),
    ("parallel_workers", "int", 0, 1024, 0, "Workers a parallel scan of the table uses."),
    ("autovacuum_analyze_threshold", "int", 0, INT_MAX, 0, "Changed tuples before autovacuum analyzes."),
    ("autovacuum_analyze_scale_factor", "real", 0, 100, 0, "Share of the table's tuples added to the analyze threshold."),
    ("user_catalog_table", "bool", None, None, 0, "Logical decoding treats the table as a catalog table."),
]

RELOPTIONS: dict[str, Reloption] = {
    r.name: r
    for r in [Reloption(n, k, lo, hi, s, m) for n, k, lo, hi, s, m in _TABLE_ONLY + _SHARED]
    + [Reloption(f"toast.{n}", k, lo, hi, s, f"TOAST table: {m}") for n, k, lo, hi, s, m in _SHARED]
}
ENUM_VALUES = ("auto", "on", "off")


def check(name: str, value: object) -> bool | int | float | str:
    """The value as PostgreSQL would take it for this option, or ValueError saying what it takes."""
    option = RELOPTIONS.get(name)
    if option is None:
        raise ValueError(f"unknown storage parameter {name!r}; PostgreSQL's table storage parameters are: "
                         + ", ".join(sorted(RELOPTIONS)))
    if option.kind == "bool":
        if isinstance(value, bool):
            return value
        raise ValueError("must be true or false")
    if option.kind == "enum":
        if isinstance(value, bool):
            return "on" if value else "off"
        if isinstance(value, str) and value.strip().lower() in ENUM_VALUES:
            return value.strip().lower()
        raise ValueError("must be auto, on or off")
    assert option.lo is not None and option.hi is not None
    span = f"between {_number(option.lo)} and {_number(option.hi)}"
    number: int | float
    if option.kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be an integer {span}")
        number = value
    else:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"must be a number {span}")
        number = float(value)
    if not option.lo <= number <= option.hi:
        raise ValueError(f"must be {span}, got {_number(number)}")
    return number


def describe(option: Reloption) -> str:
    """The option's range (if any) and meaning, for the reference."""
    if option.lo is None:
        return option.meaning
    return f"{_number(option.lo)} to {_number(option.hi or 0)}. {option.meaning}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def sql_value(value: bool | int | float | str) -> str:
    """A checked value as it is written after `name =` in WITH (...)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value  # auto, on or off: plain words
    return repr(value) if isinstance(value, float) else str(value)
