"""SQL read as text, offline: where a statement ends, its leading words, its `$n` parameters.

`pgupkeep check` runs without a database, so PostgreSQL's parser is not at hand. This lexer knows
just enough of PostgreSQL's lexical rules (quoted strings with their E'' escapes, quoted
identifiers, dollar quotes, nested comments, `$n` parameters) to find a top-level semicolon, and
refuses what it cannot read with certainty rather than guessing. It assumes
standard_conforming_strings = on, PostgreSQL's default since 9.1. Statements are also sent with
the extended protocol, which runs one statement only, so the server enforces the same rule.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_IDENT_START = re.compile(r"[A-Za-z_\u0080-\U0010ffff]")
_IDENT_REST = re.compile(r"[A-Za-z0-9_$\u0080-\U0010ffff]*")
_DOLLAR_TAG = re.compile(r"\$([A-Za-z_\u0080-\U0010ffff][A-Za-z0-9_\u0080-\U0010ffff]*)?\$")
_PARAM = re.compile(r"\$(\d+)")

# Transaction control belongs to pgupkeep: each batch is its own transaction, or autocommit.
TRANSACTION_CONTROL = ("BEGIN", "START", "COMMIT", "END", "ROLLBACK", "ABORT", "SAVEPOINT", "RELEASE")
# Statements EXPLAIN accepts (without ANALYZE nothing runs).
EXPLAINABLE = ("SELECT", "INSERT", "UPDATE", "DELETE", "MERGE", "VALUES", "WITH", "TABLE")


class SqlTextError(ValueError):
    """The text is not exactly one statement; `line` and `column` (1-based) say where."""

    def __init__(self, message: str, line: int, column: int):
        super().__init__(message)
        self.line = line
        self.column = column


@dataclass(frozen=True)
class Statement:
    text: str  # the statement, without a trailing semicolon and what follows it
    words: tuple[str, ...]  # its unquoted words, upper-cased, in order
    params: frozenset[int]  # the $n parameters it uses

    def needs_autocommit(self) -> str | None:
        """Why PostgreSQL refuses to run this inside a transaction block, or None."""
        words = self.words
        head = words[:1]
        cannot = "cannot run inside a transaction block"
        if head == ("VACUUM",):
            return f"{cannot}: VACUUM"
        if words[:2] in (("CREATE", "DATABASE"), ("DROP", "DATABASE"), ("ALTER", "SYSTEM")):
            return f"{cannot}: {' '.join(words[:2])}"
        if head == ("REINDEX",) and ("SYSTEM" in words[:4] or "DATABASE" in words[:4]):
            return f"{cannot}: REINDEX DATABASE or SYSTEM"
        if "CONCURRENTLY" in words and head in (("CREATE",), ("DROP",), ("REINDEX",), ("ALTER",)):
            return f"{cannot}: {head[0]} ... CONCURRENTLY"
        return None

    @property
    def explainable(self) -> bool:
        return bool(self.words) and self.words[0] in EXPLAINABLE


def _position(text: str, index: int) -> tuple[int, int]:
    line = text.count("\n", 0, index) + 1
    column = index - (text.rfind("\n", 0, index) + 1) + 1
    return line, column


def _error(text: str, index: int, message: str) -> SqlTextError:
    line, column = _position(text, index)
    return SqlTextError(message.format(where=f"line {line}, column {column} of the SQL"), line, column)


def _skip_string(text: str, start: int, backslash_escapes: bool) -> int:
    """The index after the string literal whose opening quote is at `start`."""
    i = start + 1
    while i < len(text):
        ch = text[i]
        if backslash_escapes and ch == "\\":
            i += 2
            continue
        if ch == "'":
            if text.startswith("'", i + 1):  # '' is a quote inside the string
                i += 2
                continue
            return i + 1
        i += 1
    raise _error(text, start, "has an unterminated quoted string starting at {where}")


def _skip_identifier(text: str, start: int) -> int:
    i = start + 1
    while i < len(text):
        if text[i] == '"':
            if text.startswith('"', i + 1):
                i += 2
                continue
            return i + 1
        i += 1
    raise _error(text, start, "has an unterminated quoted identifier starting at {where}")


def _skip_block_comment(text: str, start: int) -> int:
    depth, i = 0, start
    while i < len(text):
        if text.startswith("/*", i):
            depth, i = depth + 1, i + 2
        elif text.startswith("*/", i):
            depth, i = depth - 1, i + 2
            if depth == 0:
                return i
        else:
            i += 1
    raise _error(text, start, "has an unterminated /* comment starting at {where}")


def _skip_line_comment(text: str, start: int) -> int:
    end = text.find("\n", start)
    return len(text) if end < 0 else end + 1


def read_statement(text: str) -> Statement:
    """Read exactly one statement (a trailing semicolon and comments allowed), or raise."""
    words: list[str] = []
    params: set[int] = set()
    i, end = 0, None  # end: index of the top-level semicolon
    while i < len(text):
        ch = text[i]
        if ch.isspace():
            i += 1
        elif text.startswith("--", i):
            i = _skip_line_comment(text, i)
        elif text.startswith("/*", i):
            i = _skip_block_comment(text, i)
        elif ch == "'":
            i = _skip_string(text, i, backslash_escapes=False)
        elif ch == '"':
            i = _skip_identifier(text, i)
        elif ch == "$":
            if (m := _PARAM.match(text, i)) is not None:
                params.add(int(m.group(1)))
                i = m.end()
            elif (m := _DOLLAR_TAG.match(text, i)) is not None:
                close = text.find(m.group(0), m.end())
                if close < 0:
                    raise _error(text, i, "has an unterminated dollar-quoted string starting at {where}")
                i = close + len(m.group(0))
            else:
                i += 1
        elif _IDENT_START.match(ch):
            m = _IDENT_REST.match(text, i + 1)
            assert m is not None
            word = text[i : m.end()]
            i = m.end()
            if text.startswith("'", i):  # a prefixed literal: E'...', B'...', X'...', N'...'
                i = _skip_string(text, i, backslash_escapes=word.upper() == "E")
            else:
                words.append(word.upper())
        elif ch.isdigit():
            i += 1
            while i < len(text) and (text[i].isalnum() or text[i] in "._"):
                i += 1
        elif ch == ";":
            end = i
            break
        else:
            i += 1
    if end is not None:
        rest = end + 1
        while rest < len(text):
            if text[rest].isspace() or text[rest] == ";":
                rest += 1
            elif text.startswith("--", rest):
                rest = _skip_line_comment(text, rest)
            elif text.startswith("/*", rest):
                rest = _skip_block_comment(text, rest)
            else:
                snippet = " ".join(text[rest : rest + 40].split())
                raise _error(
                    text, rest,
                    f"holds more than one statement: the second begins at {{where}} ({snippet!r}); "
                    "give each statement an entry of its own",
                )  # fmt: skip
    body = text[:end] if end is not None else text
    if not words:
        raise SqlTextError("is empty: write one SQL statement (comments and quoted text alone are not one)", 1, 1)
    if words[0] in TRANSACTION_CONTROL or words[:2] == ["PREPARE", "TRANSACTION"]:
        raise SqlTextError(
            f"must not control transactions ({words[0]}): each batch is its own transaction "
            "(transaction: true) or runs in autocommit (transaction: false)",
            1,
            1,
        )
    return Statement(text=body.strip(), words=tuple(words), params=frozenset(params))
