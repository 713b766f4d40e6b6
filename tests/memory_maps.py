"""Linux /proc helpers for tests: which file, if any, backs a given memory address."""

from __future__ import annotations

from pathlib import Path


def file_mapped_at(address: int) -> Path | None:
    """The file whose mapping in this process contains `address` (None if anonymous memory)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if start <= address < end:
            return Path(fields[5]) if len(fields) == 6 and fields[5].startswith("/") else None
    return None


def resident_bytes_of(path: Path) -> int:
    """Resident bytes of all mappings of `path` in this process (from /proc/self/smaps)."""
    total, inside = 0, False
    target = str(Path(path).resolve())
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(maxsplit=5)
        if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            inside = len(head) == 6 and head[5] == target
        elif inside and line.startswith("Rss:"):
            total += int(head[1]) * 1024
    return total
