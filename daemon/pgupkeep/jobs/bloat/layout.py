"""Tuple layout from column statistics: the bytes an average row (or index entry) really takes.

A row's padding depends on where each column starts, and that depends on the widths and nulls of
the columns before it. Rounding an *average* row up to MAXALIGN is not the average padding, so
this tracks the distribution of the offset modulo 8 column by column (as heap_fill_tuple lays the
columns out) and averages each row's padding, with a null bitmap only in rows that have a null.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

MAXALIGN = 8
LINE_POINTER = 4  # sizeof(ItemIdData)
HEAP_HEADER = 23  # offsetof(HeapTupleHeaderData, t_bits)
INDEX_HEADER = 8  # sizeof(IndexTupleData)
INDEX_NULL_BITMAP = 4  # IndexAttributeBitMapData, present when the entry has a null
SHORT_VARLENA_MAX = 127  # a varlena this small (header included) is stored with a 1-byte header, unaligned
_ALIGN = {"c": 1, "s": 2, "i": 4, "d": 8}

Widths = tuple[tuple[int, float], ...]  # (stored width, share of the column's non-null values)


@dataclass(frozen=True)
class Column:
    attlen: int  # > 0 fixed width; -1 varlena
    attalign: str
    avg_width: int | None  # None: no pg_stats row (never analyzed)
    null_frac: float | None
    # Stored widths of the values ANALYZE sampled (most common values and histogram bounds), for
    # string columns; empty when unknown: the width then varies around avg_width.
    widths: Widths = ()


def align(offset: float, alignment: int) -> float:
    return math.ceil(offset / alignment - 1e-9) * alignment


def width_distribution(c: Column) -> Widths:
    """The stored widths of a column's non-null values, each with its share."""
    w = int(c.avg_width or 0)
    if c.attlen > 0:
        return ((c.attlen, 1.0),)
    if c.widths:
        mean = sum(width * share for width, share in c.widths)
        # Trust the sample only where it agrees with avg_width (which ANALYZE measured on every
        # sampled value, the too-wide ones included): compressed or out-of-line values are not in it.
        if abs(mean - w) <= 1.5:
            return c.widths
    if w == 18:
        return ((18, 1.0),)  # an out-of-line TOAST pointer: always 18 bytes
    # Unknown spread: widths around the average, every residue modulo 8 equally likely.
    spread = [(max(1, w + d), 1 / 16 if abs(d) == 4 else 1 / 8) for d in range(-4, 5)]
    return tuple(spread)


def _fill(columns: Sequence[Column]) -> tuple[float, list[float]]:
    """(expected data bytes, distribution of the end offset modulo MAXALIGN), from offset 0."""
    dist = [1.0] + [0.0] * (MAXALIGN - 1)
    data = 0.0
    for c in columns:
        null = c.null_frac or 0.0
        present = 1.0 - null
        nominal = _ALIGN.get(c.attalign, 1)
        new = [null * p for p in dist]
        for width, share in width_distribution(c):
            # A varlena that fits a 1-byte header is stored unaligned (heap_fill_tuple).
            a = 1 if c.attlen == -1 and width <= SHORT_VARLENA_MAX else nominal
            for r, p in enumerate(dist):
                if not p:
                    continue
                pad = (-r) % a
                weight = p * present * share
                new[(r + pad + width) % MAXALIGN] += weight
                data += weight * (pad + width)
        dist = new
    return data, dist


def _null_row_share(columns: Sequence[Column]) -> float:
    none_null = 1.0
    for c in columns:
        none_null *= 1.0 - (c.null_frac or 0.0)
    return 1.0 - none_null


def heap_tuple(columns: Sequence[Column], natts: int) -> tuple[float, float] | None:
    """(bytes one row takes on a heap page: aligned tuple plus line pointer, its raw t_len).

    None when a column has no statistics.
    """
    return _heap_tuple(tuple(columns), natts)


@functools.lru_cache(maxsize=4096)  # tables of one schema (partitions) share their layouts
def _heap_tuple(columns: tuple[Column, ...], natts: int) -> tuple[float, float] | None:
    if not columns or any(c.avg_width is None for c in columns):
        return None
    plain = align(HEAP_HEADER, MAXALIGN)
    with_bitmap = align(HEAP_HEADER + math.ceil(natts / 8), MAXALIGN)
    header = plain + _null_row_share(columns) * (with_bitmap - plain)
    data, dist = _fill(columns)
    end_pad = sum(p * ((-r) % MAXALIGN) for r, p in enumerate(dist))
    return header + data + end_pad + LINE_POINTER, header + data


def index_tuple(columns: Sequence[Column]) -> tuple[float, float] | None:
    """(bytes one plain index entry takes: MAXALIGNed tuple plus line pointer, its key bytes
    with the header MAXALIGNed, as a posting-list tuple's key part). None without statistics."""
    return _index_tuple(tuple(columns))


@functools.lru_cache(maxsize=4096)
def _index_tuple(columns: tuple[Column, ...]) -> tuple[float, float] | None:
    if not columns or any(c.avg_width is None for c in columns):
        return None
    header = INDEX_HEADER + _null_row_share(columns) * (align(INDEX_HEADER + INDEX_NULL_BITMAP, MAXALIGN) - INDEX_HEADER)
    data, dist = _fill(columns)
    end_pad = sum(p * ((-r) % MAXALIGN) for r, p in enumerate(dist))
    return header + data + end_pad + LINE_POINTER, header + data + end_pad
