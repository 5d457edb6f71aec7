"""Batches of the desktop-app upload: items are copied into the Dropbox folder one batch at a
time, and a batch is verified in Dropbox before its originals go and the next one starts.

A batch's membership is recorded in the journal when its items are first planned, so a rerun
continues the batch it was on even after verified originals were deleted (and the plan, made
from what is still on disk, no longer lists them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

from .journal import Item, State


@dataclass
class Batch:
    number: int
    items: list[Item] = field(default_factory=list)

    @property
    def size(self) -> int:
        """Bytes of all its items."""
        return sum(item.length for item in self.items)

    def bytes_to_copy(self) -> int:
        """Bytes of its items not yet in the Dropbox folder."""
        return sum(item.length for item in self.items if item.state not in (State.COPIED, State.DONE))

    @property
    def done(self) -> bool:
        return all(item.state == State.DONE for item in self.items)


def count_batches(lengths: Iterable[int], batch_bytes: int) -> int:
    """How many batches `assign_batches` makes of new items of these lengths (bytes), for the plan."""
    count, current, members = 0, 0, 0
    for length in lengths:
        if members == 0 or (length > 0 and current + length > batch_bytes):
            count, current, members = count + 1, 0, 0
        current += length
        members += 1
    return count


def assign_batches(items: Sequence[Item], batch_bytes: int, recorded: dict[int, int]) -> tuple[list[Batch], dict[int, int]]:
    """Group items (in plan order) into batches of at most `batch_bytes`.

    Items recorded in an earlier run keep their batch; new items fill new batches after the
    last recorded one, never an old batch (which may be verified already). An item larger
    than a batch gets a batch of its own. Empty items (a split file's manifest, empty files)
    never open a batch, so a manifest always travels with its last part.
    `recorded`: item id -> batch number (Journal.item_batches).
    Returns (batches in order, the new assignments to record)."""
    by_number: dict[int, Batch] = {}
    new: dict[int, int] = {}
    next_number = max(recorded.values(), default=0) + 1
    current: Batch | None = None
    current_bytes = 0
    for item in items:
        number = recorded.get(item.id)  # type: ignore[arg-type]
        if number is None:
            if current is None or (item.length > 0 and current_bytes + item.length > batch_bytes):
                current = by_number.setdefault(next_number, Batch(next_number))
                next_number += 1
                current_bytes = 0
            current_bytes += item.length
            number = current.number
            new[item.id] = number  # type: ignore[index]
        by_number.setdefault(number, Batch(number)).items.append(item)
    return [by_number[n] for n in sorted(by_number)], new
