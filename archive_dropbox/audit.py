"""`python app.py --verify`: compare every original of the sheet's rows with what Dropbox holds
now, by content hash, with the deletion gate's own proof (deletion.judge), and send or delete
nothing.

Each original is one of:
- identical: Dropbox holds its bytes (a split file: every part with the content hash of that
  range of the original, and the manifest describing the whole file);
- missing: Dropbox does not hold it (or one of its parts) at all;
- different: Dropbox holds other bytes at its path;
- deleted, identical / deleted, missing: the original was deleted after an earlier upload (the
  journal says so); Dropbox is checked against the hashes recorded then;
and Dropbox files below a folder row's destination that no original accounts for are listed as
only in Dropbox (for information). Modelled on `rclone check`, but split files are understood.

Local hashes come from the journal when the file is still the one that was hashed (size,
mtime_ns and file id unchanged and the hash computed from the local bytes); otherwise the file
is read once.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from . import deletion, prepare, units
from .content_hash import bytes_content_hash, hash_range
from .errors import EXIT_OK, EXIT_SOME_FAILED
from .inventory import is_inventory_name
from .journal import Item, Journal, Kind, SourceDeleted, State
from .logs import PER_FILE
from .names import case_key

IDENTICAL = "identical"
MISSING = "missing"
DIFFERENT = "different"
DELETED_IDENTICAL = "deleted, identical"
DELETED_MISSING = "deleted, not in Dropbox"
ONLY_IN_DROPBOX = "only in Dropbox"
GOOD = (IDENTICAL, DELETED_IDENTICAL)


@dataclass
class Finding:
    status: str
    local: str
    dropbox: str
    detail: str = ""


def _trusted(items: list[Item] | None, source: prepare.PlannedSource) -> bool:
    """Journal hashes describe the file on disk now, computed from its own bytes."""
    if not items or any(i.state != State.DONE or not i.content_hash for i in items):
        return False
    if any(not i.hash_local for i in items if i.kind != Kind.MANIFEST):
        return False
    recorded = deletion.LocalIdentity.from_record(items[0].source_size, items[0].source_mtime_ns, items[0].source_id)
    try:
        return recorded.same_file(deletion.LocalIdentity.of(source.source))
    except OSError:
        return False


def _original_from_disk(source: prepare.PlannedSource, client,
                        snapshot: deletion.RemoteSnapshot) -> tuple[deletion.UploadedOriginal, str | None]:
    """Hash the original now. For a split file the manifest in Dropbox is downloaded (it is
    small) and must describe these bytes; returns (original, why the manifest does not fit).
    Raises OSError when the original cannot be read."""
    identity = deletion.LocalIdentity.of(source.source)
    if not source.parts:
        hashed = hash_range(source.source).content_hash()
        return deletion.UploadedOriginal(source.source, identity, [
            deletion.RemoteExpectation(source.destination, hashed, 0, source.size)]), None
    expected, sha256s = [], []
    for part in source.parts:
        hasher = hash_range(source.source, part.offset, part.length, with_sha256=True)
        expected.append(deletion.RemoteExpectation(source.part_destination(part), hasher.content_hash(),
                                                   part.offset, part.length, "part"))
        sha256s.append(hasher.sha256())
    manifest_path = source.manifest_destination()
    if snapshot.get(manifest_path) is None:
        expected.append(deletion.RemoteExpectation(manifest_path, None, kind=Kind.MANIFEST))
        return deletion.UploadedOriginal(source.source, identity, expected), None
    _, chunks = client.download_range(manifest_path)
    data = b"".join(chunks)
    expected.append(deletion.RemoteExpectation(manifest_path, bytes_content_hash(data), kind=Kind.MANIFEST))
    try:
        manifest = json.loads(data)
        described = [(p["size"], p["sha256"]) for p in manifest["parts"]]
        fits = manifest["size"] == source.size and described == [(p.length, s) for p, s in zip(source.parts, sha256s)]
    except (ValueError, KeyError, TypeError):
        fits = False
    problem = None if fits else f"the manifest {manifest_path} in Dropbox does not describe this file"
    return deletion.UploadedOriginal(source.source, identity, expected), problem


def audit(plan: prepare.Plan, journal: Journal, client, folders: list[str], log) -> list[Finding]:
    """Compare every planned original (and every original deleted earlier) with Dropbox now."""
    by_source: dict[str, list[Item]] = {}
    for item in journal.items():
        by_source.setdefault(item.source, []).append(item)
    planned = {str(s.source) for s in plan.sources}
    deleted = {source: items for source, items in by_source.items()
               if source not in planned and any(i.source_deleted == SourceDeleted.DELETED for i in items)}
    # Rows whose every original was deleted plan nothing: their folders are listed all the same.
    folders = list(folders) + [deletion.parent_folder(i.remote_key_path) for items in deleted.values() for i in items]
    snapshot = deletion.RemoteSnapshot.of_folders(client, folders)
    log.info("Dropbox listed: %d entries, %d recursive listing(s).", len(snapshot.entries()), snapshot.calls)
    findings: list[Finding] = []
    accounted: set[str] = set()
    for source in plan.sources:
        items = by_source.get(str(source.source))
        manifest_problem = None
        if _trusted(items, source):
            original = deletion.uploaded_original(items)
        else:
            try:
                original, manifest_problem = _original_from_disk(source, client, snapshot)
            except OSError as exc:
                findings.append(Finding(DIFFERENT, str(source.source), source.destination,
                                        f"the original cannot be read ({exc.strerror})"))
                continue
        accounted.update(case_key(e.dropbox_path) for e in original.expected)
        verdict = deletion.judge(original, snapshot)
        if verdict.proven and manifest_problem is None:
            findings.append(Finding(IDENTICAL, str(source.source), source.destination))
        else:
            status = MISSING if verdict.missing else DIFFERENT
            findings.append(Finding(status, str(source.source), source.destination,
                                    verdict.reason or manifest_problem or ""))
            if items:  # its folder is looked at again by the next upload, which then sends it
                journal.settled_folders.forget_one(items[0])
    for source_path, items in deleted.items():
        accounted.update(case_key(i.remote_key_path) for i in items)
        wrong = [i.remote_key_path for i in items
                 if getattr(snapshot.get(i.remote_key_path), "content_hash", None) != i.content_hash]
        if wrong:
            findings.append(Finding(DELETED_MISSING, source_path, items[0].destination,
                                    f"the original was deleted after its upload, and Dropbox does not hold "
                                    f"{wrong[0]} as uploaded"))
        else:
            findings.append(Finding(DELETED_IDENTICAL, source_path, items[0].destination))
    for remote in snapshot.entries():
        if (hasattr(remote, "content_hash") and case_key(remote.path_display) not in accounted
                and not is_inventory_name(remote.path_display.rsplit("/", 1)[-1])):  # written by the upload
            findings.append(Finding(ONLY_IN_DROPBOX, "", remote.path_display))
    return findings


def write_report(findings: list[Finding], log_path: Path, log) -> Path:
    """Counts on screen and in the log, every difference in the log, all rows in a CSV."""
    csv_path = log_path.with_suffix(".csv")
    with open(csv_path, "w", newline="", encoding="utf-8-sig") as handle:  # utf-8-sig: Excel reads it right
        writer = csv.writer(handle)
        writer.writerow(["status", "local file", "Dropbox path", "detail"])
        for finding in findings:
            writer.writerow([finding.status, finding.local, finding.dropbox, finding.detail])
    counts: dict[str, int] = {}
    for finding in findings:
        counts[finding.status] = counts.get(finding.status, 0) + 1
        if finding.status not in GOOD:
            level = log.info if finding.status == ONLY_IN_DROPBOX else log.error
            level("%s\t%s\t->\t%s%s", finding.status.upper(), finding.local or "-", finding.dropbox,
                  f": {finding.detail}" if finding.detail else "", extra=PER_FILE)
    order = (IDENTICAL, MISSING, DIFFERENT, DELETED_IDENTICAL, DELETED_MISSING, ONLY_IN_DROPBOX)
    log.info("Verify: %s.", "; ".join(f"{counts.get(status, 0)} {status}" for status in order))
    log.info("Report: %s", csv_path)
    return csv_path


def run_verify(context, sheet: str, *, prepare_rows, open_client) -> int:
    """app.py --verify for an upload tab: exit 0 only when every original is in Dropbox, identical."""
    settings = context.settings
    part_limit = int(min(settings.fileSizeLimit_GB * units.GB, prepare.DROPBOX_API_MAX_FILE))
    with Journal(context.logs_root / "journal.sqlite3", sheet, log=context.log) as journal:
        plan = prepare_rows(context, sheet, destination_of_row=lambda row: row["outputDir"], part_limit=part_limit,
                            already_done=journal.deleted_sources(), mode="API", bytes_per_second=50e6)
        client = open_client(context)
        context.log.info("Verify: comparing every original of tab '%s' with Dropbox now (nothing is sent or "
                         "deleted).", sheet)
        folders = sorted({str(row["outputDir"]) for row in _rows(plan)})
        findings = audit(plan, journal, client, folders, context.log)
    write_report(findings, context.log_path, context.log)
    bad = [f for f in findings if f.status not in GOOD and f.status != ONLY_IN_DROPBOX]
    if bad:
        context.log.error("%d original(s) are not in Dropbox identical: see the lines above and the report. Run "
                          "app.py (without --verify) to send what is missing.", len(bad))
        return EXIT_SOME_FAILED
    context.log.info("Every original of this tab is in Dropbox, identical (content hash).")
    return EXIT_OK


def _rows(plan: prepare.Plan):
    seen = {}
    for source in plan.sources:
        seen[id(source.row)] = source.row
    for row in plan.done_rows:
        seen[id(row)] = row
    return list(seen.values())
