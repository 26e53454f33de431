"""The restorer's subcommands for the `snapscale` CLI (the service itself and its operator verbs)."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add this package's subcommands to the `snapscale` parser."""
