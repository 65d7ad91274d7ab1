"""Catalog states of partitioned tables that take more than one session to reach."""

from __future__ import annotations

import psycopg
import pytest


def leave_detach_pending(dsn: str, parent: str, partition: str) -> None:
    """A concurrent detach that gives up while waiting for an older snapshot stays pending."""
    with psycopg.connect(dsn) as holder, psycopg.connect(dsn, autocommit=True) as other:
        holder.execute(f"SELECT count(*) FROM {parent}")  # an open transaction with a snapshot
        other.execute("SET lock_timeout = '100ms'")
        with pytest.raises(psycopg.errors.LockNotAvailable):
            other.execute(f"ALTER TABLE {parent} DETACH PARTITION {partition} CONCURRENTLY")
        holder.rollback()
