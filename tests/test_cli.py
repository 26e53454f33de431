"""The `snapscale` command as an operator meets it: real processes on real nats-servers. It fails
fast with one line and an exit code that says which kind of failure, says nothing on success
but the answer, validates a spec without a server, and documents every argument."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
from conftest import NatsServer
from nats.js.errors import NotFoundError as NoStream

from snapscale.cli import EXIT_FAILED, EXIT_NOT_FOUND, EXIT_USAGE, build_parser
from snapscale.demo.procs import free_port
from snapscale.shared import bus
from snapscale.shared.bus import Bucket
from snapscale.shared.core.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "examples" / "sample_cpu.toml"


def snapscale(
    *argv: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "snapscale", *argv],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}, check=False,
    )  # fmt: skip


def env_for(settings: Settings) -> dict[str, str]:
    return {"SNAPSCALE_NATS_URL": settings.nats_url, "SNAPSCALE_NAMESPACE": settings.namespace}


def test_help_from_the_venv() -> None:
    exe = Path(sys.executable).parent / "snapscale"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True, timeout=60)
    assert "usage: snapscale" in out.stdout
    assert "deploy" in out.stdout and "exit codes: 0 ok; 1 failed or unavailable" in out.stdout


def subcommands(p: argparse.ArgumentParser, path: str = "") -> list[tuple[str, argparse.ArgumentParser]]:
    out = []
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sp in a.choices.items():
                out.append((f"{path}{name}", sp))
                out += subcommands(sp, f"{path}{name} ")
    return out


SUBCOMMANDS = subcommands(build_parser())
REPORTING = {"deploy", "undeploy", "deployments", "status", "wait", "freeze", "prefetch", "traffic",
             "checkpoints ls", "checkpoints show", "checkpoints verify", "checkpoints gc"}  # fmt: skip


@pytest.mark.parametrize(("name", "p"), SUBCOMMANDS, ids=[n for n, _ in SUBCOMMANDS])
def test_every_argument_has_help_with_its_default_and_the_environment(
    name: str, p: argparse.ArgumentParser
) -> None:
    text = " ".join(p.format_help().split())
    for a in p._actions:
        if a.help == argparse.SUPPRESS or isinstance(a, argparse._HelpAction | argparse._SubParsersAction):
            continue
        assert a.help, f"snapscale {name}: {a.option_strings or a.dest} has no help"
        if a.option_strings and a.default not in (None, False):
            assert f"(default: {a.default})" in text or "default" in a.help, (
                f"snapscale {name}: {a.option_strings[0]} does not say its default"
            )
    if "SNAPSCALE_" not in text:
        pytest.fail(f"snapscale {name} --help names no environment variable")
    if name in REPORTING:
        assert any("--json" in a.option_strings for a in p._actions), f"snapscale {name} has no --json"


def test_durations_and_sizes_read_with_units() -> None:
    p = build_parser()
    assert p.parse_args(["freeze", "d", "--timeout", "2m"]).timeout == 120.0
    assert p.parse_args(["freeze", "d", "--timeout-s", "120"]).timeout == 120.0  # the former spelling
    assert p.parse_args(["restorer", "--suspend-budget", "2GiB"]).suspend_budget_bytes == 2 << 30
    assert p.parse_args(["freezer", "--chunk-size", "4MiB"]).chunk_bytes == 4 << 20
    assert p.parse_args(["scaler"]).tick_s == 1.0


def test_a_bad_flag_value_is_a_usage_error() -> None:
    r = snapscale("freeze", "d", "--timeout", "soon")
    assert r.returncode == EXIT_USAGE and "argument --timeout: duration 'soon'" in r.stderr
    r = snapscale("restorer", "--suspend-budget", "2GB")
    assert r.returncode == EXIT_USAGE and "is decimal; say GiB" in r.stderr


def test_a_bad_spec_lists_every_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\ncommand = []\nprot = 8000\n[scaling]\nmin_replicas = 3\nmax_replicas = 1\n')
    r = snapscale("deploy", str(bad))
    assert r.returncode == EXIT_USAGE and r.stdout == ""
    assert "3 problems" in r.stderr and "Traceback" not in r.stderr
    for line in (
        "command: is empty",
        "prot: unknown key (did you mean 'port'?)",
        "scaling.min_replicas: 3 is above",
    ):
        assert line in r.stderr
    r = snapscale("deploy", str(bad), "--dry-run", "--json")
    assert r.returncode == EXIT_USAGE
    got = orjson.loads(r.stdout)
    assert not got["ok"] and [p["field"] for p in got["problems"]] == [
        "prot",
        "command",
        "scaling.min_replicas",
    ]


def test_dry_run_needs_no_server() -> None:
    dead = {"SNAPSCALE_NATS_URL": f"nats://127.0.0.1:{free_port()}"}
    r = snapscale("deploy", str(SAMPLE), "--dry-run", env=dead)
    assert r.returncode == 0 and r.stderr == ""
    assert (
        r.stdout.startswith(f"{SAMPLE}: ok, deployment sample-cpu (spec hash ") and "not deployed" in r.stdout
    )


ON_NATS = [
    ["status"], ["deployments"], ["deploy", str(SAMPLE)], ["undeploy", "d"], ["wait", "d"], ["freeze", "d"],
    ["prefetch", "d", "--host", "h"], ["traffic", "d", "--for", "1s"],
]  # fmt: skip


@pytest.mark.parametrize("argv", ON_NATS, ids=[a[0] for a in ON_NATS])
def test_unreachable_nats_is_one_line_and_exit_1_within_seconds(argv: list[str]) -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    r = snapscale(*argv, env={"SNAPSCALE_NATS_URL": url}, timeout=30)
    took = time.monotonic() - t0
    assert r.returncode == EXIT_FAILED, r.stderr
    port = url.rsplit(":", 1)[1]
    why = f"[Errno 111] Connect call failed ('127.0.0.1', {port})"
    assert r.stderr == f"snapscale {argv[0]}: NATS at {url} is unreachable: {why}\n"
    assert r.stdout == ""
    assert took < 15, f"took {took:.1f}s"  # the connect gives up in 5 s; the rest is starting Python


def test_a_bad_url_is_one_line_and_exit_1() -> None:
    r = snapscale("status", env={"SNAPSCALE_NATS_URL": "http://127.0.0.1:4222"})
    assert r.returncode == EXIT_FAILED
    assert r.stderr.count("\n") == 1 and "is not a NATS URL: use nats://host:4222" in r.stderr


@pytest.mark.parametrize("argv", [["status"], ["deploy", str(SAMPLE)]], ids=["status", "deploy"])
def test_no_jetstream_is_one_line(argv: list[str], no_jetstream: NatsServer) -> None:
    r = snapscale(*argv, env={"SNAPSCALE_NATS_URL": no_jetstream.url})
    assert r.returncode == EXIT_FAILED
    assert r.stderr == (
        f"snapscale {argv[0]}: NATS at {no_jetstream.url} has no JetStream: start nats-server with -js "
        "(or enable it for this account)\n"
    )


async def test_success_says_only_the_answer_and_status_creates_nothing(settings: Settings) -> None:
    env = env_for(settings)
    st = snapscale("status", env=env)
    assert st.returncode == 0 and st.stderr == "" and "HOSTS" in st.stdout
    probe = await bus.open_bus(settings, "probe", create=False, operator=True)
    try:
        assert probe.kv == {}, "status created buckets"
        with pytest.raises(NoStream):
            await probe.js.stream_info(probe.subjects.cmd_stream)
    finally:
        await probe.close()

    d = snapscale("deploy", str(SAMPLE), env=env)
    assert d.returncode == 0 and d.stderr == "", d.stderr
    assert d.stdout.startswith("deployed sample-cpu (new, spec hash ")
    listed = snapscale("deployments", "--json", env=env)
    assert listed.returncode == 0 and listed.stderr == ""
    [row] = orjson.loads(listed.stdout)
    assert row["name"] == "sample-cpu" and row["spec"]["port"] == 8000
    assert orjson.loads(snapscale("status", "--json", env=env).stdout)["replicas"] == []

    gone = snapscale("undeploy", "sample-cpu", env=env)
    assert gone.returncode == 0 and gone.stderr == "", gone.stderr
    assert gone.stdout == "undeployed sample-cpu: 0 replicas stopped\n"
    again = snapscale("undeploy", "sample-cpu", env=env)
    assert again.returncode == EXIT_NOT_FOUND
    assert (
        again.stderr
        == "snapscale undeploy: deployment sample-cpu is not deployed (see `snapscale deployments`)\n"
    )
    check = await bus.open_bus(settings, "check", create=False, operator=True)
    try:
        assert await bus.kv_get(check.kv[Bucket.DEPLOYMENTS], "sample-cpu") is None
    finally:
        await check.close()


def test_not_found_and_usage_have_their_own_codes(settings: Settings) -> None:
    env = env_for(settings)
    r = snapscale("prefetch", "d", "--host", "nowhere", env=env)
    assert r.returncode == EXIT_NOT_FOUND and "host nowhere is not reporting" in r.stderr
    r = snapscale("freeze", "d", "--replica", "../x", env=env)
    assert r.returncode == EXIT_USAGE and "must match" in r.stderr
    r = snapscale("status", "--bogus", env=env)
    assert r.returncode == EXIT_USAGE and "unrecognized arguments: --bogus" in r.stderr


def test_every_environment_variable_read_is_in_the_help_table() -> None:
    """The environment sections of --help come from one table (core/cliargs.py ENV): a variable the
    code reads and the table lacks fails here, naming it."""
    import re

    from snapscale.shared.core.cliargs import ENV

    documented = " ".join(f"{e.name} {e.what}" for e in ENV)
    read: set[str] = set()
    for path in (ROOT / "snapscale").rglob("*.py"):
        if path.name != "cliargs.py":
            read |= set(re.findall(r"\"((?:SNAPSCALE|OTEL|AWS)_[A-Z0-9_]+)\"", path.read_text()))
    assert read, "the scan found nothing: the pattern is wrong"
    assert sorted(n for n in read if n not in documented) == []


def test_bad_request_limits_are_refused_at_deploy(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\ncommand = ["serve"]\n[scaling]\nqueue_size = -5\nqueue_timeout_s = 0\n')
    r = snapscale("deploy", str(bad), "--dry-run")
    assert r.returncode == EXIT_USAGE and "2 problems" in r.stderr
    assert "scaling.queue_size: must be at least 0" in r.stderr
    assert "scaling.queue_timeout_s: must be above 0" in r.stderr
