"""Every PromQL query of the Grafana dashboard, run against a real Prometheus (Debian's 2.42)
that scraped a real `snapscale restorer` through two scale-ups: each must be valid PromQL and
answer finite numbers, with the labels its legend names.

The dashboard's TraceQL panels read Tempo, which cannot run here (no Tempo binary in the package
registries this project installs from): tests/test_compose.py checks their span names and
attributes against tests/span_contract.py instead, and test_demo.py that the services emit them.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import span_contract as sc
from engine_helpers import kill_tagged
from restorer_harness import Harness, follow, spawn

from snapscale.demo.procs import free_port, wait_port
from snapscale.shared import bus
from snapscale.shared.bus.messages import ReplicaState, Tier
from snapscale.shared.core.settings import Settings
from snapscale.shared.engine.criu import CriuBinary

pytestmark = [pytest.mark.criu, pytest.mark.slow]

DASHBOARD = Path(__file__).resolve().parent.parent / "compose" / "grafana" / "dashboards" / "snapscale.json"
# Grafana's variables, as wide as the test's whole run: every sample it scraped is in the window.
GRAFANA_VARS = {"$__rate_interval": "5m", "$__range": "5m", "$__interval": "1s"}
_LEGEND_LABEL = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


class Prometheus:
    """A Prometheus server on loopback scraping `targets` every second, with its TSDB in `tmp`."""

    def __init__(self, tmp: Path, targets: list[str]) -> None:
        exe = shutil.which("prometheus")
        if exe is None:
            raise RuntimeError("no prometheus binary: `make setup` installs Debian's prometheus")
        cfg = tmp / "prometheus.yml"
        cfg.write_text(
            json.dumps(  # JSON is YAML
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "scrape_configs": [{"job_name": "snapscale", "static_configs": [{"targets": targets}]}],
                }
            )
        )
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [exe, f"--config.file={cfg}", f"--storage.tsdb.path={tmp / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=subprocess.DEVNULL,
            stderr=open(tmp / "prometheus.log", "wb"),  # noqa: SIM115 - the server outlives this call
        )  # fmt: skip
        wait_port(self.port, timeout_s=30)

    def query(self, promql: str) -> dict[str, Any]:
        """The instant query's whole answer (status, data or error)."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = r.read()
        except urllib.error.HTTPError as e:  # a bad query answers 400 with the error in JSON
            body = e.read()
        answer = json.loads(body)
        assert isinstance(answer, dict)
        return answer

    def value(self, promql: str) -> float | None:
        res = self.query(promql)
        assert res["status"] == "success", res
        vec = res["data"]["result"]
        return float(vec[0]["value"][1]) if vec else None

    async def wait(self, promql: str, ok: Callable[[float | None], bool], timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        v = None
        while time.monotonic() < deadline:
            v = await asyncio.to_thread(self.value, promql)
            if ok(v):
                return
            await asyncio.sleep(0.5)
        raise AssertionError(f"{promql}: {v} after {timeout_s}s")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


@pytest.fixture
def prom_and_port(tmp_path: Path) -> Iterator[tuple[Prometheus, int]]:
    port = free_port()
    p = Prometheus(tmp_path, [f"127.0.0.1:{port}"])
    yield p, port
    p.stop()


@pytest.fixture
async def h(
    s3_settings: Settings, the_bus: bus.Bus, criu: CriuBinary, tmp_path: Path
) -> AsyncIterator[Harness]:
    tag = f"rprom-{uuid.uuid4().hex[:10]}"
    harness = Harness(s3_settings, the_bus, criu, tag, tmp_path)
    async for _ in follow(harness):
        yield harness
    kill_tagged(tag)


def promql_targets() -> list[tuple[str, dict[str, Any]]]:
    dash = json.loads(DASHBOARD.read_text())
    panels = [p for top in dash["panels"] for p in (top, *top.get("panels", []))]
    targets = [(p["title"], t) for p in panels for t in p.get("targets", [])]
    return [(title, t) for title, t in targets if t["datasource"]["type"] == "prometheus"]


def with_vars(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, f"a Grafana variable this test does not know: {expr}"
    return expr


def check_answer(title: str, target: dict[str, Any], answer: dict[str, Any]) -> list[str]:
    """What is wrong with one query's answer: an error, nothing, a non-finite value, a missing label."""
    if answer.get("status") != "success":
        return [f"{title}: {answer.get('errorType')}: {answer.get('error')}"]
    series = answer["data"]["result"]
    if not series:
        return [f"{title}: empty result"]
    wrong = []
    for s in series:
        v = float(s["value"][1])
        if not math.isfinite(v):
            wrong.append(f"{title}: {s['metric']} = {v}")
        for label in _LEGEND_LABEL.findall(target.get("legendFormat", "")):
            if label not in s["metric"]:
                wrong.append(f"{title}: legend names {label}, the series has {sorted(s['metric'])}")
    return wrong


def test_checks_fail_on_bad_answers() -> None:
    """The answer check can fail: an error, an empty vector, NaN, a label the legend wants."""
    t = {"legendFormat": "{{snapscale_tier}}"}

    def answer(*series: tuple[dict[str, str], str]) -> dict[str, Any]:
        return {"status": "success", "data": {"result": [{"metric": m, "value": [0, v]} for m, v in series]}}

    store = {"snapscale_tier": "store"}
    assert check_answer("x", t, answer((store, "1.5"))) == []
    assert check_answer("x", t, {"status": "error", "errorType": "bad_data", "error": "parse error"})
    assert check_answer("x", t, answer())
    assert check_answer("x", t, answer((store, "1.5"), (store, "NaN")))
    assert check_answer("x", t, answer(({}, "1")))


async def test_every_promql_query_answers_after_two_scale_ups(
    h: Harness, prom_and_port: tuple[Prometheus, int]
) -> None:
    prom, metrics_port = prom_and_port
    targets = promql_targets()
    assert len(targets) >= 4, "the dashboard's Prometheus panels"
    spec = await h.deploy(h.spec())
    await h.make_checkpoint(spec)
    proc = spawn(
        h.settings,
        h.criu,
        h.tmp / "restorer.log",
        {"SNAPSCALE_METRICS_PORT": str(metrics_port), "SNAPSCALE_METRICS_HOST": "127.0.0.1"},
    )
    try:
        wait_port(metrics_port, timeout_s=30)
        await prom.wait('up{job="snapscale"}', lambda v: v == 1.0)
        # Both sources of the bytes counter exist at 0 before any scale-up, so its first increase counts.
        await prom.wait(f"count({sc.SCALE_UP_IO_METRIC.replace('.', '_')}_bytes_total)", lambda v: v == 2.0)

        # Two scale-ups by one tier with a scrape between: a rate needs a series to change after it
        # appeared (Prometheus cannot see the first increment of a new series).
        count = f"sum({sc.SCALE_UP_DURATION_METRIC.replace('.', '_')}_seconds_count)"
        for n, replica in enumerate(("a", "b"), start=1):
            # not the cache tier for b: both by store. Cold stays allowed: scaleup.py refuses a command
            # that allows neither resume nor cold before its lookup ("no checkpoint for key").
            await h.restore(spec.name, replica, allow_tiers=[Tier.STORE, Tier.COLD])
            ev = await h.wait(replica, timeout_s=60)
            assert ev.state is ReplicaState.READY and ev.tier is Tier.STORE, ev
            await prom.wait(count, lambda v, n=n: v == float(n))  # type: ignore[misc]
        await asyncio.sleep(2.0)  # one more scrape: the last counts settled in every series

        wrong: list[str] = []
        for title, t in targets:
            wrong += check_answer(title, t, await asyncio.to_thread(prom.query, with_vars(t["expr"])))
        assert not wrong, "\n".join(wrong)
        # what the panels show is what happened: both scale-ups by store, bytes from both sources
        io_expr = with_vars(next(t["expr"] for _, t in targets if "io_bytes" in t["expr"]))
        by_source = await asyncio.to_thread(prom.query, io_expr)
        got = {s["metric"]["snapscale_source"]: float(s["value"][1]) for s in by_source["data"]["result"]}
        assert got["store"] > 0 and got["cache"] > 0, got
    finally:
        proc.terminate()
        proc.wait(60)
