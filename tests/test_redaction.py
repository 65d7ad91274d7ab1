"""Secrets and personal data: a password is hidden only where it stands as one, and other sessions'
query text reaches logs and findings only as `log_query_text` allows."""

from __future__ import annotations

import contextlib
import threading
import time
from datetime import UTC, datetime
from urllib.parse import quote

import psycopg
import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgupkeep import db, logs
from pgupkeep.jobs import long_running_queries as lrq
from pgupkeep.jobs.base import JobContext
from pgupkeep.policy import parse_policy
from pgupkeep.results import JobResult
from pgupkeep.runner import execute_job
from pgupkeep.units import QUERY_TEXT_TRUNCATED, query_text

COMMON_WORDS = ("postgres", "password", "user", "host", "database", "a", "1", "failed")


@pytest.mark.parametrize("password", COMMON_WORDS)
def test_a_password_that_is_a_common_word_is_hidden_only_where_it_is_the_password(password: str) -> None:
    dsn = f"host=db user=postgres password={password} dbname=postgres"
    text = (
        f'connection to server at "db" failed: FATAL:  password authentication failed for user "postgres" '
        f"(database postgres, host db); dsn was {dsn}; uri postgresql://postgres:{password}@db/postgres"
    )
    assert db.redact(text, dsn) == (
        'connection to server at "db" failed: FATAL:  password authentication failed for user "postgres" '
        "(database postgres, host db); dsn was host=db user=postgres password=*** dbname=postgres; "
        "uri postgresql://postgres:***@db/postgres"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("password='with space' user=u", "password=*** user=u"),
        ("password='it\\'s' user=u", "password=*** user=u"),
        ('password = "dq x', "password = *** x"),
        ("password=back\\ slash x", "password=*** x"),
        ("PGPASSWORD=hunter2 psql", "PGPASSWORD=*** psql"),
        ("sslpassword=k3y sslkey=/k", "sslpassword=*** sslkey=/k"),
        ("postgres://u:p%40ss@h:5432,h2/db?sslmode=require", "postgres://u:***@h:5432,h2/db?sslmode=require"),
        ("postgresql://u@h/db and postgresql://h/db", "postgresql://u@h/db and postgresql://h/db"),
        ('role "password" does not exist', 'role "password" does not exist'),
    ],
)
def test_password_positions_quoted_or_not(text: str, expected: str) -> None:
    assert db.redact(text) == expected


passwords = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1, max_size=30)


@settings(max_examples=300, deadline=None)
@given(password=passwords, user=st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True))
def test_any_password_in_a_conninfo_or_uri_is_hidden_and_nothing_else_changes(password: str, user: str) -> None:
    conninfo = make_conninfo(host="db", user=user, password=password, dbname="shop")
    hidden = conninfo_to_dict(db.redact(conninfo))
    assert hidden == {"host": "db", "user": user, "password": "***", "dbname": "shop"}
    uri = f"postgresql://{user}:{quote(password, safe='')}@db/shop"
    assert conninfo_to_dict(db.redact(uri)) == {"host": "db", "user": user, "password": "***", "dbname": "shop"}


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=200).filter(lambda t: "password" not in t.lower() and "://" not in t))
def test_text_with_no_password_in_it_is_left_alone(text: str) -> None:
    assert db.redact(text, "host=h password=postgres") == text


def test_a_real_connection_error_keeps_words_equal_to_the_password(pg_server) -> None:
    dsn = pg_server.dsn("postgres_nowhere")
    policy = parse_policy(
        'version: 1\ntargets:\n  - {name: t, dsn: "${DSN}"}\n',
        environ={"DSN": make_conninfo(dsn, password="postgres")},
    )
    with pytest.raises(psycopg.OperationalError) as err:
        db.connect(policy.target("t"))
    assert 'database "postgres_nowhere" does not exist' in str(err.value)
    assert "***" not in str(err.value)


# --------------------------------------------------------------------------- log_query_text

LONG_QUERY = "SELECT pg_sleep(60) /* " + "personal data " * 30 + "*/"


def test_query_text_modes() -> None:
    assert query_text(LONG_QUERY, "full") == LONG_QUERY
    assert query_text(LONG_QUERY, "truncated") == LONG_QUERY[:QUERY_TEXT_TRUNCATED] + "..."
    assert query_text("SELECT 1", "truncated") == "SELECT 1"
    assert query_text(LONG_QUERY, "none") is None
    assert query_text(None, "full") is None


@pytest.fixture
def sleeper(database: str):
    conn = psycopg.connect(database, autocommit=True, application_name="shop")
    thread = threading.Thread(target=lambda: _run(conn), daemon=True)
    thread.start()
    with psycopg.connect(database, autocommit=True) as admin:
        for _ in range(500):
            row = admin.execute(
                "SELECT state, now() - query_start > interval '250 ms' FROM pg_stat_activity WHERE pid = %s",
                (conn.info.backend_pid,),
            ).fetchone()
            if row and row[0] == "active" and row[1]:
                break
            time.sleep(0.02)
        yield conn.info.backend_pid
        admin.execute("SELECT pg_cancel_backend(%s)", (conn.info.backend_pid,))
    thread.join(10)
    conn.close()


def _run(conn: psycopg.Connection) -> None:
    with contextlib.suppress(psycopg.Error):  # cancelled when the test is done
        conn.execute(LONG_QUERY)


@pytest.mark.parametrize(
    ("daemon_mode", "target_mode", "expected"),
    [
        (None, None, LONG_QUERY[:QUERY_TEXT_TRUNCATED] + "..."),  # the default: truncated
        ("full", None, LONG_QUERY),
        ("none", None, None),
        ("full", "none", None),  # a target's own setting wins
        ("none", "truncated", LONG_QUERY[:QUERY_TEXT_TRUNCATED] + "..."),
    ],
)
def test_log_query_text_governs_findings_and_log_lines(
    database: str, sleeper: int, daemon_mode: str | None, target_mode: str | None, expected: str | None
) -> None:
    daemon = f"daemon: {{log_query_text: {daemon_mode}}}\n" if daemon_mode else ""
    own = f", log_query_text: {target_mode}" if target_mode else ""
    policy = parse_policy(
        f'version: 1\n{daemon}targets:\n  - {{name: t, dsn: "${{DSN}}"{own}, long_running_queries: {{warn_after: 200ms}}}}\n',
        environ={"DSN": database},
    )
    target = policy.target("t")
    with db.connect(target) as conn:
        ctx = JobContext(target=target, section=target.long_running_queries, conn=conn,
                         now=datetime.now(UTC), timezone=policy.daemon.zone, apply=False)  # fmt: skip
        out = execute_job(lrq.KIND, ctx)
    [finding] = [f for f in out.findings if f.object == f"pid {sleeper}"]
    assert finding.detail["query"] == expected
    result = JobResult(target="t", job="long_running_queries", outcome="success", duration_seconds=0.1,
                       started_at=time.time(), findings=tuple(out.findings))  # fmt: skip
    with structlog.testing.capture_logs() as captured:
        logs.log_result(result)
    [line] = [e for e in captured if e["event"] == "long_running_query" and e["pid"] == sleeper]
    assert line["query"] == expected
    text = repr(captured)
    if expected is None:
        assert "personal data" not in text
    elif expected != LONG_QUERY:
        assert LONG_QUERY not in text
