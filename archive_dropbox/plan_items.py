"""Stage 2's view of a plan: its files with their journal items, read in pages of PAGE_FILES
files, so that what an upload holds depends on the page, not on the number of files (issue 18).

The plan (prepare.Plan; its sources are a PlanStore on disk, or a list in tests) says what to
send; the journal says how far each item got. `journal.sync_plan` is asked page by page: the
first time a page is read it records the page's items (new ones pending, changed files started
over), every later time it reads back their recorded state - so the journal, not memory, is
where the items live between pages."""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

from .journal import Item, Journal
from .prepare import Plan, PlannedSource

# Files of a plan held at once with their items (~0.6 KB per item, as measured at 100,000 files).
PAGE_FILES = 10_000

Pair = tuple[int, PlannedSource, list[Item]]  # (position in the plan, the file, its items in order)


def item_count(source: PlannedSource) -> int:
    """How many items put `source` into Dropbox: 1, or its parts and the manifest."""
    return len(source.parts) + 1 if source.parts else 1


def sources_between(plan: Plan, start: int, stop: int) -> Iterator[PlannedSource]:
    """plan.sources[start:stop], from a PlanStore in pages (a list is sliced)."""
    ranged = getattr(plan.sources, "between", None)
    return ranged(start, stop) if ranged is not None else iter(plan.sources[start:stop])


def pages(plan: Plan, journal: Journal, start: int = 0, stop: int | None = None,
          size: int | None = None) -> Iterator[list[Pair]]:
    """The plan's files from `start` to `stop` (default: all) with their journal items, `size`
    (default PAGE_FILES) files a page. JournalError when the journal cannot be written."""
    stop = len(plan.sources) if stop is None else stop
    size = size or PAGE_FILES
    page: list[PlannedSource] = []
    position = start
    for source in sources_between(plan, start, stop):
        page.append(source)
        if len(page) >= size:
            yield _with_items(page, position, journal)
            position += len(page)
            page = []
    if page:
        yield _with_items(page, position, journal)


def pairs(plan: Plan, journal: Journal, start: int = 0, stop: int | None = None) -> Iterator[Pair]:
    """pages(), one file at a time."""
    for page in pages(plan, journal, start, stop):
        yield from page


def pair_up(sources: Iterable[PlannedSource], items: Sequence[Item], position: int) -> Iterator[Pair]:
    """Each of `sources` (the plan's, from `position` on) with its items, taken in order from
    `items` (journal.sync_plan's answer for them). RuntimeError when they are not the plan's (a
    bug: nothing may be written from them)."""
    at = 0
    for offset, source in enumerate(sources):
        count = item_count(source)
        chunk = list(items[at:at + count])
        if not chunk or chunk[0].source != str(source.source):
            raise RuntimeError(f"the journal's items are not in the plan's order at {source.source}")
        yield position + offset, source, chunk
        at += count


def _with_items(sources: list[PlannedSource], position: int, journal: Journal) -> list[Pair]:
    items = journal.sync_plan(item for source in sources for item in source.items(journal.job))
    return list(pair_up(sources, items, position))
