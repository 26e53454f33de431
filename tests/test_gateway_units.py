"""The gateway's pure parts: routing, the headers each way, the pool's choices, its limits from the
spec, its settings from the environment."""

from __future__ import annotations

import time
from dataclasses import replace

import orjson
import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from snapscale.gateway.config import GatewayConfig, parse_listen
from snapscale.gateway.pool import DEFAULT_LIMITS, DeploymentGone, Limits, Pool, Stopping, limits_of
from snapscale.gateway.routing import NoRoute, Route, downstream_headers, route, upstream_headers
from snapscale.shared.bus import DeploymentSpec, ReplicaEvent, ReplicaState
from snapscale.shared.core.errors import ConfigError
from snapscale.shared.core.fieldcheck import FieldsError

S = ReplicaState


# --- routing ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("host", "path", "domain", "want"),
    [
        (None, "/llm/v1/chat?x=1", "", Route("llm", "/v1/chat?x=1", "/llm")),
        (None, "/llm", "", Route("llm", "/", "/llm")),
        (None, "/llm?stream=1", "", Route("llm", "/?stream=1", "/llm")),
        (None, "/llm/", "", Route("llm", "/", "/llm")),
        ("llm.models.test", "/v1/chat", "models.test", Route("llm", "/v1/chat", "")),
        ("LLM.Models.Test.:8443", "/v1", "models.test", Route("llm", "/v1", "")),
        ("other.test", "/llm/x", "models.test", Route("llm", "/x", "/llm")),  # not ours: the path says
        ("a.b.models.test", "/llm/x", "models.test", Route("llm", "/x", "/llm")),  # not one token
        ("llm.models.test", "/x", "", Route("x", "/", "/x")),  # no domain: Host is not looked at
    ],
)
def test_route(host: str | None, path: str, domain: str, want: Route) -> None:
    assert route(host, path, domain) == want


@pytest.mark.parametrize(
    ("path", "domain", "reason"),
    [
        ("/", "", "no deployment named in the path (/<deployment>/...)"),
        ("/?x=1", "d.test", "no deployment named in the path (/<deployment>/...) or the Host header"),
        ("/a.b/x", "", "'a.b' is not a deployment name ([A-Za-z0-9_-]+)"),
        ("/%41/x", "", "'%41' is not a deployment name"),
        ("http://llm/x", "", "request target 'http://llm/x' is not a path"),
    ],
)
def test_no_route_says_why(path: str, domain: str, reason: str) -> None:
    with pytest.raises(NoRoute) as e:
        route(None, path, domain)
    assert e.value.reason.startswith(reason)


def _h(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


def test_upstream_headers_drop_hop_by_hop_and_set_the_forwarded_ones() -> None:
    got = upstream_headers(
        _h(
            ("Host", "gw.test"),
            ("Connection", "close, X-Hop"),
            ("X-Hop", "1"),
            ("TE", "trailers"),
            ("Transfer-Encoding", "chunked"),
            ("Upgrade", "h2c"),
            ("Proxy-Authorization", "secret"),
            ("Expect", "100-continue"),
            ("X-Forwarded-For", "1.1.1.1"),
            ("X-Forwarded-For", "2.2.2.2"),
            ("X-Forwarded-Proto", "https"),
            ("Via", "1.0 edge"),
            ("Cookie", "a=1"),
            ("Cookie", "b=2"),
        ),
        client_ip="10.0.0.7",
        scheme="http",
        version=(1, 1),
        prefix="/llm",
        via="snapscale-gateway",
    )
    assert list(got.items()) == [
        ("Host", "gw.test"),
        ("Cookie", "a=1"),
        ("Cookie", "b=2"),
        ("X-Forwarded-For", "1.1.1.1, 2.2.2.2, 10.0.0.7"),
        ("X-Forwarded-Proto", "http"),  # what this hop saw, not what the client claimed
        ("X-Forwarded-Host", "gw.test"),
        ("X-Forwarded-Prefix", "/llm"),
        ("Via", "1.0 edge, 1.1 snapscale-gateway"),
    ]


def test_downstream_headers_keep_repeated_ones_and_frame_nothing() -> None:
    got = downstream_headers(
        _h(
            ("Content-Type", "text/event-stream"),
            ("Transfer-Encoding", "chunked"),
            ("Connection", "keep-alive, X-Internal"),
            ("X-Internal", "1"),
            ("Keep-Alive", "timeout=5"),
            ("Set-Cookie", "a=1"),
            ("Set-Cookie", "b=2"),
        ),
        version=(1, 0),
        via="gw",
    )
    assert list(got.items()) == [
        ("Content-Type", "text/event-stream"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
        ("Via", "1.0 gw"),
    ]


# --- the pool -------------------------------------------------------------------------------
def ready(pool: Pool, replica: str, port: int) -> None:
    pool.apply(ReplicaEvent(pool.deployment, replica, "h", S.READY, 0.0, endpoint=f"10.0.0.1:{port}"), 0.0)


async def test_least_outstanding_first_and_ties_in_turn() -> None:
    pool = Pool("llm", DEFAULT_LIMITS)
    ready(pool, "a", 1)
    ready(pool, "b", 2)
    ready(pool, "c", 3)
    firsts = [pool.take() for _ in range(3)]
    assert sorted(u.replica for u in firsts if u) == ["a", "b", "c"]  # one each before any gets two
    b = pool.replicas["b"]
    pool.give_back(b)
    assert pool.take() is b  # the only one with nothing in flight
    pool.give_back(pool.replicas["a"])
    pool.give_back(pool.replicas["c"])
    assert pool.take(avoid="a") is pool.replicas["c"]  # a retry never goes back to its replica


async def test_the_per_replica_limit_holds_requests_in_order() -> None:
    pool = Pool("llm", Limits(concurrency=1, queue_size=2, queue_timeout_s=1.0))
    ready(pool, "a", 1)
    a = pool.take()
    assert a is not None and pool.take() is None
    w1, w2 = pool.hold(), pool.hold()
    assert w1 is not None and w2 is not None and pool.hold() is None  # the queue holds 2
    pool.give_back(a)
    assert w1.future.result() is a and not w2.future.done()  # first held, first served
    ready(pool, "b", 2)
    assert w2.future.result() is pool.replicas["b"]  # a replica ready: served at once
    pool.set_limits(Limits(concurrency=2, queue_size=2, queue_timeout_s=1.0))
    assert pool.take() is not None  # a higher limit has room


async def test_a_held_retry_is_served_by_another_replica_only() -> None:
    pool = Pool("llm", DEFAULT_LIMITS)
    ready(pool, "a", 1)
    w = pool.hold(avoid="a")
    assert w is not None and not w.future.done()
    other = pool.hold()  # a newcomer behind it can use "a"
    assert other is not None and other.future.result() is pool.replicas["a"]
    ready(pool, "b", 2)
    assert w.future.result() is pool.replicas["b"]


async def test_a_replica_leaving_and_coming_back_elsewhere() -> None:
    pool = Pool("llm", DEFAULT_LIMITS)
    ready(pool, "a", 1)
    old = pool.replicas["a"]
    assert pool.apply(ReplicaEvent("llm", "a", "h", S.READY, 0.0, endpoint="10.0.0.1:9"), 0.0) is old
    assert pool.replicas["a"].endpoint == "10.0.0.1:9"
    gone = pool.apply(ReplicaEvent("llm", "a", "h", S.RELEASING, 0.0), 0.0)
    assert gone is not None and gone.endpoint == "10.0.0.1:9" and not pool.replicas
    assert pool.take() is None


@pytest.mark.parametrize(
    ("states", "failed", "why", "after"),
    [
        ([S.RESTORING, S.STARTING], False, "restoring", 1),
        ([S.STARTING], False, "cold booting", 2),
        ([S.PENDING], False, "placing a replica", 1),
        ([], True, "failed: criu restore failed", 5),
        ([], False, "no replica yet (scaling from zero)", 2),
    ],
)
async def test_a_refusal_says_what_the_replicas_are_doing(
    states: list[ReplicaState], failed: bool, why: str, after: int
) -> None:
    pool = Pool("llm", Limits(0, 10, 30.0))
    now = time.time()
    if failed:
        pool.apply(ReplicaEvent("llm", "x", "h", S.FAILED, now, reason="criu restore failed"), now)
    for i, st in enumerate(states):
        pool.apply(ReplicaEvent("llm", f"r{i}", "h", st, now), now)
    r = pool.refusal(now, queue_full=False)
    assert r.reason == f"deployment llm: {why}; no replica within 30s"
    assert r.retry_after_s == after
    assert pool.refusal(now, queue_full=True).reason == f"deployment llm: {why}; 10 requests held already"
    # a failure a minute old no longer explains anything
    assert "failed" not in pool.refusal(now + 61, queue_full=False).reason


async def test_undeploy_and_stop_answer_held_requests() -> None:
    pool = Pool("llm", DEFAULT_LIMITS)
    w = pool.hold()
    assert w is not None
    pool.undeploy()
    with pytest.raises(DeploymentGone):
        w.future.result()
    w = pool.hold()
    assert w is not None
    pool.stop()
    with pytest.raises(Stopping):
        w.future.result()
    with pytest.raises(Stopping):
        pool.hold()


async def test_reports_count_arrivals_and_say_zero_once() -> None:
    pool = Pool("llm", DEFAULT_LIMITS)
    assert pool.report("gw", 1.0) is None  # nothing ever happened
    pool.arrivals, pool.active = 3, 2
    ev = pool.report("gw", 2.0)
    assert ev is not None and (ev.arrivals, ev.concurrency, ev.source, ev.ts) == (3, 2.0, "gw", 2.0)
    pool.active = 0
    last = pool.report("gw", 3.0)
    assert last is not None and (last.arrivals, last.concurrency) == (0, 0.0)
    assert pool.report("gw", 4.0) is None


def test_limits_come_from_the_spec_and_bad_ones_name_the_field() -> None:
    spec = DeploymentSpec(name="llm", command=["x"])
    assert limits_of(spec) == Limits(0, 1000, 120.0)
    assert limits_of(replace(spec, scaling=replace(spec.scaling, concurrency_limit=4))).concurrency == 4
    plain = {"name": "llm", "command": ["x"], "scaling": {"queue_size": -1, "queue_timeout_s": 0}}
    with pytest.raises(FieldsError) as e:
        DeploymentSpec.from_json(orjson.dumps(plain))
    assert [p.path for p in e.value.problems] == ["scaling.queue_size", "scaling.queue_timeout_s"]


# --- settings -----------------------------------------------------------------------------
def test_settings_from_the_environment_and_flags() -> None:
    env = {
        "SNAPSCALE_GATEWAY_LISTEN": "10.1.2.3:9000",
        "SNAPSCALE_GATEWAY_DOMAIN": "Models.Example",
        "SNAPSCALE_GATEWAY_ID": "gw-7",
        "SNAPSCALE_GATEWAY_REPORT_S": "0.25",
    }
    c = GatewayConfig.from_env("host", env)
    assert (c.listen_host, c.listen_port, c.domain, c.gateway_id, c.report_s) == (
        "10.1.2.3", 9000, "models.example", "gw-7", 0.25,
    )  # fmt: skip
    c = GatewayConfig.from_env("host", env, listen=":8081", domain=None, gateway_id="flag")
    assert (c.listen_host, c.listen_port, c.domain) == ("0.0.0.0", 8081, "models.example")
    assert c.gateway_id == "flag"
    d = GatewayConfig.from_env("h1", {})
    assert (d.listen_host, d.listen_port, d.domain) == ("0.0.0.0", 8080, "")
    assert d.gateway_id.startswith("h1-") and d.gateway_id != GatewayConfig.from_env("h1", {}).gateway_id
    assert parse_listen("[::1]:80") == ("::1", 80)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SNAPSCALE_GATEWAY_LISTEN": "8080"}, "gateway listen address '8080': use host:port"),
        ({"SNAPSCALE_GATEWAY_LISTEN": "a:99999"}, "gateway listen port: must be within 0..65535, got 99999"),
        ({"SNAPSCALE_GATEWAY_REPORT_S": "2"}, "gateway report_s: must be within (0, 1] s, got 2.0"),
        ({"SNAPSCALE_GATEWAY_REPORT_S": "x"}, "SNAPSCALE_GATEWAY_REPORT_S='x' is not a number"),
        ({"SNAPSCALE_GATEWAY_DOMAIN": ".example"}, "gateway domain '.example': give it without"),
    ],
)
def test_bad_settings_name_the_variable_and_why(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        GatewayConfig.from_env("h", env)
    assert str(e.value).startswith(message)


async def test_a_scale_up_trace_that_comes_before_the_record_stays() -> None:
    """The replica event (with the trace) may arrive before its KV record: the record keeps it."""
    pool = Pool("llm", DEFAULT_LIMITS)
    pool.trace["a"] = {"traceparent": "00-1-2-01"}
    pool.apply(ReplicaEvent("llm", "a", "h", S.RESTORING, 0.0), 0.0)
    ready(pool, "a", 1)
    assert pool.trace["a"] == {"traceparent": "00-1-2-01"}
    pool.apply(ReplicaEvent("llm", "a", "h", S.STOPPED, 0.0), 0.0)
    assert "a" not in pool.trace and not pool.coming


async def test_a_replica_refusing_connections_is_set_aside_then_readmitted() -> None:
    pool = Pool("llm", DEFAULT_LIMITS)
    ready(pool, "a", 1)
    assert pool.eject("a") and not pool.eject("a")
    assert pool.take() is None
    r = pool.refusal(0.0, queue_full=False)
    assert r.reason.startswith("deployment llm: its ready replicas refuse connections")
    w = pool.hold()
    assert w is not None and not w.future.done()
    pool.readmit("a")
    assert w.future.result() is pool.replicas["a"]  # held requests go to it again at once
    pool.lose("a")
    pool.readmit("a")  # gone meanwhile: nothing comes back
    assert pool.take() is None
