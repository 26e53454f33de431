"""What every reporting verb shares: the `--json` flag, and JSON on stdout (sorted keys, indented)."""

from __future__ import annotations

import argparse

import orjson

from snapscale.shared.core import wire


def json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the answer as JSON")


def print_json(obj: object) -> None:
    print(orjson.dumps(wire.to_plain(obj), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode())
