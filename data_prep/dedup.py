"""Clean, part 2: near-duplicate photos by perceptual hash, across all classes and sources.

Two images are the same photo when their hashes differ in at most `max_distance` bits. Comparing all pairs
is quadratic, so this uses multi-index hashing (Norouzi et al., CVPR 2012): cut each `bits`-bit hash into
`m` chunks. If two hashes differ in at most d bits, some chunk differs in at most r = ceil((d + 1) / m) - 1
bits (otherwise they would differ in at least m * (r + 1) > d bits). So each hash only needs to be compared
with the hashes found in m lookup tables under the chunk values within r bits of its own.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import combinations
from math import comb


@dataclass(frozen=True)
class Chunk:
    """Bits [offset, offset + width) of the hash, looked up under every value within `radius` bits."""

    offset: int
    width: int
    radius: int

    def value(self, hash_value: int) -> int:
        return (hash_value >> self.offset) & ((1 << self.width) - 1)

    def flips(self) -> list[int]:
        """Every mask of at most `radius` set bits within `width` bits (0 first)."""
        return [sum(1 << bit for bit in bits) for k in range(min(self.radius, self.width) + 1)
                for bits in combinations(range(self.width), k)]


def plan_chunks(count: int, bits: int, max_distance: int) -> list[Chunk]:
    """The chunking with the least expected work for `count` random hashes: lookups x expected bucket size."""
    best: tuple[float, list[Chunk]] | None = None
    for parts in range(1, min(max_distance + 1, bits) + 1):
        radius = -(-(max_distance + 1) // parts) - 1
        widths = [bits // parts + (index < bits % parts) for index in range(parts)]
        offsets = [sum(widths[:index]) for index in range(parts)]
        chunks = [Chunk(offset, width, radius) for offset, width in zip(offsets, widths, strict=True)]
        lookups = sum(sum(comb(chunk.width, k) for k in range(min(radius, chunk.width) + 1)) for chunk in chunks)
        work = lookups * (1 + count / 2 ** min(widths))
        if best is None or work < best[0]:
            best = (work, chunks)
    assert best is not None
    return best[1]


def near_pairs(hashes: Sequence[int], bits: int, max_distance: int) -> Iterator[tuple[int, int]]:
    """Index pairs (i < j) of distinct hashes at most `max_distance` bits apart (a pair may repeat)."""
    chunks = plan_chunks(len(hashes), bits, max_distance)
    tables: list[dict[int, list[int]]] = []
    for chunk in chunks:
        table: dict[int, list[int]] = defaultdict(list)
        for index, hash_value in enumerate(hashes):
            table[chunk.value(hash_value)].append(index)
        tables.append(dict(table))
    flips = [chunk.flips() for chunk in chunks]
    for index, hash_value in enumerate(hashes):
        for chunk, table, masks in zip(chunks, tables, flips, strict=True):
            own = chunk.value(hash_value)
            for mask in masks:
                for other in table.get(own ^ mask, ()):
                    if other > index and (hash_value ^ hashes[other]).bit_count() <= max_distance:
                        yield index, other


class UnionFind:
    """Connected components over 0..size-1."""

    def __init__(self, size: int) -> None:
        self.parent = list(range(size))

    def find(self, item: int) -> int:
        while self.parent[item] != item:
            self.parent[item] = self.parent[self.parent[item]]
            item = self.parent[item]
        return item

    def union(self, first: int, second: int) -> None:
        self.parent[self.find(first)] = self.find(second)


def group_near_duplicates(hashes: Sequence[int], bits: int, max_distance: int) -> list[list[int]]:
    """Indices into `hashes` grouped by 'at most max_distance bits apart' (transitively).

    Only groups of two or more; each group sorted, groups sorted by their first index. Equal hashes are
    merged first, so a photo copied a thousand times costs no more than one.
    """
    unique = sorted(set(hashes))
    components = UnionFind(len(unique))
    for first, second in near_pairs(unique, bits, max_distance):
        components.union(first, second)
    position = {hash_value: index for index, hash_value in enumerate(unique)}
    members: dict[int, list[int]] = defaultdict(list)
    for index, hash_value in enumerate(hashes):
        members[components.find(position[hash_value])].append(index)
    return sorted((group for group in members.values() if len(group) > 1), key=lambda group: group[0])


def resolve_duplicates(groups: list[list[int]], labels: Sequence[str],
                       names: Sequence[str]) -> dict[int, tuple[str, str]]:
    """(reason, detail) for every image to drop.

    A group within one class keeps its first member (callers order images by preference) and drops the
    rest as `duplicate`; a group spanning classes is a `label_conflict` and loses every member.
    """
    dropped: dict[int, tuple[str, str]] = {}
    for group in groups:
        classes = sorted({labels[index] for index in group})
        if len(classes) > 1:
            for index in group:
                others = [names[other] for other in group if other != index]
                detail = f"same photo labelled {' and '.join(classes)}: {_short_list(others)}"
                dropped[index] = ("label_conflict", detail)
        else:
            for index in group[1:]:
                dropped[index] = ("duplicate", f"same photo as {names[group[0]]}")
    return dropped


def _short_list(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"
