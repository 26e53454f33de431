"""Print the Debian archive mirror this machine's apt configuration already uses.

Used by scripts/setup to fetch CRIU from another suite without naming a host in the repo.
Reads deb822 `.sources` files and one-line `.list` files; skips security mirrors.
"""

from __future__ import annotations

import glob
import sys


def _deb822(text: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if ":" in line and not line.startswith((" ", "#")):
                k, v = line.split(":", 1)
                fields[k.strip().lower()] = v.strip()
        if "deb" in fields.get("types", "").split() and fields.get("enabled", "yes") != "no":
            for uri in fields.get("uris", "").split():
                out.append((uri, fields.get("suites", "")))
    return out


def _oneline(text: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0] == "deb":
            rest = [p for p in parts[1:] if not p.startswith("[") and not p.endswith("]") and "=" not in p]
            if len(rest) >= 2:
                out.append((rest[0], rest[1]))
    return out


def find_mirror() -> str | None:
    entries: list[tuple[str, str]] = []
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        with open(path) as f:
            entries += _deb822(f.read())
    for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
        try:
            with open(path) as f:
                entries += _oneline(f.read())
        except FileNotFoundError:
            continue
    for uri, suites in entries:
        if "security" in uri or "security" in suites:
            continue
        if uri.rstrip("/").endswith("/debian"):
            return uri.rstrip("/")
    return None


if __name__ == "__main__":
    mirror = find_mirror()
    if mirror is None:
        sys.exit(1)
    print(mirror)
