"""Sizes and durations as lab users read them. One GB is 10^9 bytes everywhere, so that
fileSizeLimit_GB means the same number of bytes in every script."""

from __future__ import annotations

GB = 1_000_000_000
MIB = 1024 * 1024


def human_bytes(count: float) -> str:
    """1234567 -> '1.23 MB' (decimal units, as disks and Dropbox quotas are sold)."""
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(count) < 1000 or unit == "PB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.2f} {unit}"
        count /= 1000
    return f"{count:.2f} PB"


def human_duration(seconds: float) -> str:
    """A duration in seconds as people read it: "0.5 s", "36 s", "2 min 5 s", "3 h 10 min",
    "2 d 4 h". Below a minute the seconds keep one decimal (sleepTime_min = 0.01 is 0.6 s),
    so that a short wait never reads as "0 min"."""
    if seconds < 60:
        return f"{round(seconds, 1):g} s"
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min {seconds} s"
