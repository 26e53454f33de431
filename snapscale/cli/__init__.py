"""The one `snapscale` command: a subcommand per service plus the operator's verbs.

Thin: parse, build Settings from the environment once, hand over to the owning package.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from snapscale import __version__
from snapscale import demo as demo_cli
from snapscale.cli import store as shared_cli
from snapscale.freezer import cli as freezer_cli
from snapscale.gateway import cli as gateway_cli
from snapscale.restorer import cli as restorer_cli
from snapscale.scaler import cli as scaler_cli
from snapscale.shared.core.errors import SnapscaleError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="snapscale",
        description="Scale GPU inference to zero and back in seconds by restoring frozen, warmed sandboxes.",
    )
    p.add_argument("--version", action="version", version=f"snapscale {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (scaler_cli, freezer_cli, restorer_cli, gateway_cli, shared_cli, demo_cli):
        module.register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc: int = args.func(args)
    except SnapscaleError as e:
        print(f"snapscale: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return rc


if __name__ == "__main__":
    sys.exit(main())
