"""The one `snapscale` command: a subcommand per service plus the operator's verbs.

Thin: parse, build Settings from the environment once, hand over to the owning package (the
operator's verbs to `snapscale.client`). An expected failure is one line on stderr and an exit
code that says which kind it was; a traceback means a bug.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import nats.errors

from snapscale import __version__
from snapscale import demo as demo_cli
from snapscale.cli import store as store_cli
from snapscale.cli import verbs as verbs_cli
from snapscale.freezer import cli as freezer_cli
from snapscale.gateway import cli as gateway_cli
from snapscale.restorer import cli as restorer_cli
from snapscale.scaler import cli as scaler_cli
from snapscale.shared.core.cliargs import Formatter
from snapscale.shared.core.errors import (
    ConfigError,
    MessageError,
    NotFoundError,
    SnapscaleError,
    UnavailableError,
)
from snapscale.shared.core.settings import NatsUrlError
from snapscale.simulate import cli as simulate_cli

# Exit codes, the same for every verb (README, "Operator verbs"):
EXIT_FAILED = 1  # it did not work: NATS or the store unreachable, no answer in time, a check failed
EXIT_USAGE = 2  # bad arguments or input (argparse's own code too); nothing was done
EXIT_NOT_FOUND = 3  # the deployment, replica, host or checkpoint named does not exist
EXIT_INTERRUPTED = 130

EPILOG = f"""exit codes: 0 ok; {EXIT_FAILED} failed or unavailable (NATS or the store unreachable, no
answer in time, a check that found damage); {EXIT_USAGE} bad arguments or input; {EXIT_NOT_FOUND} not found.
Each subcommand's --help lists its arguments' defaults and the environment variables it reads."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="snapscale",
        description="Scale GPU inference to zero and back in seconds by restoring frozen, warmed sandboxes.",
        epilog=EPILOG,
        formatter_class=Formatter,
    )
    p.add_argument("--version", action="version", version=f"snapscale {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (
        scaler_cli,
        freezer_cli,
        restorer_cli,
        gateway_cli,
        verbs_cli,
        store_cli,
        demo_cli,
        simulate_cli,
    ):
        module.register(sub)
    return p


def exit_code(e: BaseException) -> int:
    """Which kind of failure `e` is, as an exit code."""
    if isinstance(e, NatsUrlError):  # no server to reach under that name: unavailable, like a refusal
        return EXIT_FAILED
    if isinstance(e, ConfigError | MessageError):
        return EXIT_USAGE
    if isinstance(e, NotFoundError):
        return EXIT_NOT_FOUND
    return EXIT_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc: int = args.func(args)
    except (SnapscaleError, TimeoutError) as e:
        print(f"snapscale {args.command}: {e}", file=sys.stderr)
        return exit_code(e)
    except nats.errors.Error as e:  # the connection broke mid-way (UnavailableError covers the start)
        print(f"snapscale {args.command}: NATS: {e or type(e).__name__}", file=sys.stderr)
        return exit_code(UnavailableError(str(e)))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return rc


if __name__ == "__main__":
    sys.exit(main())
