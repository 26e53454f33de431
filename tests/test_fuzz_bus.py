"""A fuzz of malformed messages on every subject the services consume, on the real services.

The restorer, freezer and scaler run as `snapscale` processes on the real nats-server, store and
CRIU. In each round, one malformed message of one kind goes to every subject they consume
(random bytes, not an object, wrong types, huge strings, dots, slashes and wildcards in ids,
non-finite and absurd numbers, oversize bodies, unknown and missing fields, a wrong version),
then traffic for a deployment not yet running must bring a replica up by the normal path. At
the end: every service still runs, every bad message was refused with a log line and none with
a traceback, every scale-up came up, the consumers hold nothing unsettled, nothing of a bad
message is left in a ledger, a run dir, the sandbox registry or KV, and a freeze still works.

Seeded (SNAPSCALE_FUZZ_SEED, default 16) and bounded: 13 rounds of 9 messages, well under a
minute. Table of what it sends and what it saw: docs/reliability.md, "Bad input at the door".
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import os
import random
import re
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import orjson
import pytest
from engine_helpers import ROOT, kill_tagged, sample_spec
from nats.aio.msg import Msg
from restorer_harness import service_env

from snapscale.demo.procs import ProcessSet, log_tail, reap_sandboxes
from snapscale.restorer.ledger import LEDGER_TYPE, Entry
from snapscale.scaler.lease import LEASE_KEY
from snapscale.shared import bus
from snapscale.shared.bus.catalog import CATALOG_TYPE, CatalogEntry
from snapscale.shared.bus.spec import DeploymentSpec, ScalingSpec
from snapscale.shared.bus.subjects import Bucket, Verb, replica_key
from snapscale.shared.core import wire
from snapscale.shared.core.settings import Settings
from snapscale.shared.engine.criu import CriuBinary

pytestmark = [pytest.mark.criu, pytest.mark.slow]

SEED = int(os.environ.get("SNAPSCALE_FUZZ_SEED", "16"))
HOST = "h1"
ID_FIELDS = ("deployment", "replica", "host", "id", "command_id", "checkpoint_id", "compat_hash")
KINDS = [
    "random bytes",
    "not an object",
    "wrong type",
    "huge string",
    "dot in an id",
    "slash in an id",
    "wildcard, space or nothing in an id",
    "non-finite number",
    "absurd number",
    "oversize body",
    "unknown field",
    "missing field",
    "wrong version or type",
]


@dataclass(frozen=True)
class Target:
    """A subject a service consumes, a valid message for it, and how it is sent."""

    name: str
    send: str  # "core", "js" or "kv"
    address: str  # subject, or KV key
    msg: Any  # a message dataclass
    type_name: str


def targets(b: bus.Bus, dep: str, r: int) -> list[Target]:
    s, now, ghost = b.subjects, time.time(), f"fz-ghost-{r}"
    hb = bus.HostHeartbeat(HOST, now, "k" * 64, gpus=[bus.GpuInfo(0, "GPU-0", "m", 1 << 30)])
    rev = bus.ReplicaEvent(dep, ghost, HOST, bus.ReplicaState.READY, now, command_id="c1")
    cev = bus.CheckpointEvent(dep, HOST, True, now, command_id="c1", checkpoint_id="ck1")
    return [
        Target("traffic", "core", s.traffic(dep), bus.TrafficEvent(dep, now, 1, 1.0), bus.TrafficEvent.TYPE),
        Target("host heartbeat", "core", s.evt_host(HOST), hb, bus.HostHeartbeat.TYPE),
        Target("replica event", "js", s.evt_replica(dep), rev, bus.ReplicaEvent.TYPE),
        Target("checkpoint event", "js", s.evt_checkpoint(dep), cev, bus.CheckpointEvent.TYPE),
        Target("scale-up", "js", s.cmd(Verb.SCALE_UP, HOST),
               bus.ScaleUpCommand(f"fz-{r}-su", dep, ghost, now), bus.ScaleUpCommand.TYPE),
        Target("release", "js", s.cmd(Verb.RELEASE, HOST),
               bus.ReleaseCommand(f"fz-{r}-rel", dep, ghost, now), bus.ReleaseCommand.TYPE),
        Target("prefetch", "js", s.cmd(Verb.PREFETCH, HOST),
               bus.PrefetchCommand(f"fz-{r}-pf", dep, now), bus.PrefetchCommand.TYPE),
        Target("freeze", "js", s.cmd(Verb.FREEZE, HOST),
               bus.FreezeCommand(f"fz-{r}-fr", dep, ghost, now), bus.FreezeCommand.TYPE),
        # under the deployment this round scales up: its lookup lists it
        Target("catalog entry", "kv", f"{dep}.fuzz{r}",
               CatalogEntry(dep, "a" * 64, "ck1", "manifests/x.json", now), CATALOG_TYPE),
    ]  # fmt: skip


def malformed(kind: str, t: Target, rng: random.Random) -> bytes:
    """`t.msg` on the wire, broken in the way `kind` says; never something the decoder takes."""
    body: dict[str, Any] = orjson.loads(wire.encode(t.msg, t.type_name))
    cls = type(t.msg)
    ids = [f for f in ID_FIELDS if isinstance(body.get(f), str) and body[f]]
    numbers = [k for k, v in body.items() if type(v) in (int, float) and k != "v"]
    required = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    pick = rng.choice
    if kind == "random bytes":
        return rng.randbytes(rng.randint(0, 300))
    if kind == "not an object":
        return pick([b"[]", b"42", b'"scale-up"', b"null", b"true", b"[{}]"])
    if kind == "wrong type":
        field = pick([k for k in body if k not in ("v", "type")])
        # a number where a string (or an optional id) goes, a string anywhere else
        body[field] = 7 if body[field] is None or isinstance(body[field], str) else "x"
    elif kind == "huge string":
        body[pick(ids)] = "x" * rng.randint(100_000, 200_000)
    elif kind == "dot in an id":
        body[pick(ids)] = pick(["a.b", "fz.1", "x.>", ".."])
    elif kind == "slash in an id":
        body[pick(ids)] = pick(["../../etc/passwd", "a/b", "/", "..\\x"])
    elif kind == "wildcard, space or nothing in an id":
        body[pick(ids)] = pick(["*", ">", "a b", "", "\x00", "é"])
    elif kind == "non-finite number":
        field = pick(numbers)
        body[field] = "__N__"
        return orjson.dumps(body).replace(b'"__N__"', pick([b"1e999", b"-1e999", b"NaN", b"Infinity"]))
    elif kind == "absurd number":
        body[pick(numbers)] = pick([1.7e308, -1, -1e300, 2**63])
    elif kind == "oversize body":
        body["pad"] = "x" * (300 * 1024)
    elif kind == "unknown field":
        body[pick(["replcia", "concurency", "deadline", "extra"])] = 1
    elif kind == "missing field":
        del body[pick(required)]
    elif kind == "wrong version or type":
        if rng.random() < 0.5:
            body["v"] = pick([0, 2, "1", None])
        else:
            body["type"] = pick(["scale-up", "release", "traffic", "host", "", 1])
            if body["type"] == t.type_name:
                body["type"] = "nonsense"
    else:
        raise AssertionError(kind)
    return orjson.dumps(body)


# Where each service says it refused one message of a target: (log, pattern) per target name.
def refusal_patterns(ns: str) -> dict[str, tuple[str, str]]:
    q = re.escape
    return {
        "traffic": ("scaler", rf"dropped malformed message on {q(ns)}\.traffic\."),
        "host heartbeat": ("scaler", rf"dropped malformed message on {q(ns)}\.evt\.host\.{HOST}:"),
        "replica event": ("scaler", rf"refused message on {q(ns)}\.evt\.replica\."),
        "checkpoint event": ("scaler", r"dropped malformed checkpoint event"),
        "scale-up": ("restorer", rf"refused message on {q(ns)}\.cmd\.scale-up\.{HOST}:"),
        "release": ("restorer", rf"refused message on {q(ns)}\.cmd\.release\.{HOST}:"),
        "prefetch": ("restorer", rf"refused message on {q(ns)}\.cmd\.prefetch\.{HOST}:"),
        "freeze": ("freezer", rf"refused message on {q(ns)}\.cmd\.freeze\.{HOST}:"),
        "catalog entry": ("scaler", r"catalog fz-\d+\.fuzz\d+ unreadable"),
    }


def fuzz_spec(name: str, tag: str) -> DeploymentSpec:
    """The sample server without torch: one replica from the first traffic event, kept for good."""
    d = sample_spec(name, tag=tag, preset="none")
    scaling = ScalingSpec(target_concurrency=1.0, utilization=1.0, max_replicas=1, stable_window_s=600.0,
                          scale_to_zero_after_s=600.0, ready_timeout_s=60.0, release_mode="stop")  # fmt: skip
    return replace(d, scaling=scaling)


@contextlib.asynccontextmanager
async def services(settings: Settings, criu: CriuBinary, tmp: Path) -> AsyncIterator[ProcessSet]:
    env = service_env(replace(settings, host_id=HOST), criu)
    me = [sys.executable, "-m", "snapscale"]
    procs = ProcessSet(tmp / "logs")
    try:
        for name, argv in (
            ("restorer", [*me, "restorer", "--host", HOST, "--heartbeat-s", "0.5", "--cpu-slots", "16"]),
            ("freezer", [*me, "freezer", "--host", HOST]),
            ("scaler", [*me, "scaler", "--tick-s", "0.2", "--lease-s", "1"]),
        ):
            procs.start(name, argv, env, cwd=ROOT)
        yield procs
    finally:
        procs.stop_all()
        reap_sandboxes(tmp)


def alive(procs: ProcessSet) -> None:
    dead = procs.dead()
    assert not dead, "\n".join(f"--- {m.name} died\n{log_tail(m.log_path, 30)}" for m in dead)


async def until(cond: Callable[[], bool], timeout_s: float, what: str, procs: ProcessSet) -> None:
    for _ in range(int(timeout_s / 0.05)):
        alive(procs)
        if cond():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {timeout_s} s: {what} (seed {SEED})")


async def send(b: bus.Bus, t: Target, data: bytes) -> None:
    if t.send == "core":
        await b.nc.publish(t.address, data)
    elif t.send == "js":
        await b.js.publish(t.address, data)
    else:
        await b.kv[Bucket.CHECKPOINTS].put(t.address, data)


async def test_malformed_messages_on_every_subject_are_refused_and_scale_ups_go_on(
    settings: Settings, the_bus: bus.Bus, criu: CriuBinary, tmp_path: Path
) -> None:
    rng = random.Random(SEED)
    tag = f"fuzz-{uuid.uuid4().hex[:8]}"
    b, t0 = the_bus, time.monotonic()
    ready: dict[str, bus.ReplicaEvent] = {}  # deployment -> its ready event
    checkpoints: list[bus.CheckpointEvent] = []

    async def on_replica(m: Msg) -> None:
        with contextlib.suppress(Exception):  # the fuzz's own bad events pass here too
            ev = bus.decode_message(m.data, bus.ReplicaEvent)
            if ev.state is bus.ReplicaState.READY:
                ready[ev.deployment] = ev

    async def on_checkpoint(m: Msg) -> None:
        with contextlib.suppress(Exception):  # the fuzz's own bad events pass here too
            checkpoints.append(bus.decode_message(m.data, bus.CheckpointEvent))

    subs = [
        await b.nc.subscribe(b.subjects.evt_replica_all(), cb=on_replica),
        await b.nc.subscribe(b.subjects.evt_checkpoint_all(), cb=on_checkpoint),
    ]
    sent: dict[str, int] = {}
    try:
        async with services(settings, criu, tmp_path) as procs:
            deadline = time.monotonic() + 60
            while not await _up(b):
                alive(procs)
                assert time.monotonic() < deadline, "services not up in 60 s"
                await asyncio.sleep(0.1)
            deps = [fuzz_spec(f"fz-{r}", tag) for r in range(len(KINDS))]
            for d in deps:
                await b.kv[Bucket.DEPLOYMENTS].put(d.name, d.to_json())
            await asyncio.sleep(1.0)  # the scaler's KV watch has them (and the scaler leads by now)

            for r, kind in enumerate(KINDS):
                dep = deps[r].name
                for t in targets(b, dep, r):
                    await send(b, t, malformed(kind, t, rng))
                    sent[t.name] = sent.get(t.name, 0) + 1
                await b.nc.flush()
                # then the normal path: traffic for a deployment with no replica brings one up
                ev = bus.TrafficEvent(dep, time.time(), arrivals=1, concurrency=1.0)
                for _ in range(3):  # a gateway reports more than once; core NATS may drop one
                    await bus.publish_core(b, b.subjects.traffic(dep), ev)
                await until(functools.partial(dict.__contains__, ready, dep), 60,
                            f"{dep} ready after the '{kind}' round", procs)  # fmt: skip

            # a freeze still works after all that
            first = ready[deps[0].name]
            cmd = bus.FreezeCommand(
                f"fz-final-{tag}", first.deployment, first.replica, time.time(), force=True
            )
            await bus.publish(b, b.subjects.cmd(Verb.FREEZE, HOST), cmd, msg_id=cmd.id)
            done = lambda: any(c.command_id == cmd.id for c in checkpoints)  # noqa: E731
            await until(done, 90, "the final freeze", procs)
            frozen = next(c for c in checkpoints if c.command_id == cmd.id)
            assert frozen.ok, frozen.reason

            # every bad message was settled (the final freeze's ack follows its event): none held back
            for service, verb in (("restorer", Verb.SCALE_UP), ("restorer", Verb.RELEASE),
                                  ("restorer", Verb.PREFETCH), ("freezer", Verb.FREEZE)):  # fmt: skip
                durable = b.subjects.durable(service, verb, HOST)
                for _ in range(100):
                    info = await b.js.consumer_info(b.subjects.cmd_stream, durable)
                    if (info.num_pending, info.num_ack_pending) == (0, 0):
                        break
                    await asyncio.sleep(0.1)
                assert (info.num_pending, info.num_ack_pending) == (0, 0), (service, verb, info)
            alive(procs)
            logs = {m.name: m.log_path.read_text(errors="replace") for m in procs.procs}
    finally:
        for s in subs:
            await s.unsubscribe()
        kill_tagged(tag)

    # every bad message refused, with a line saying so, and none with a traceback
    for name, (service, pattern) in refusal_patterns(settings.namespace).items():
        assert len(re.findall(pattern, logs[service])) == sent[name], (name, sent[name], SEED)
    for service, text in logs.items():
        assert "Traceback" not in text, f"{service}:\n{text[text.index('Traceback') - 2000 :][:4000]}"
    assert sum(sent.values()) == len(KINDS) * 9
    # every scale-up came up, by the normal path
    assert sorted(ready) == sorted(d.name for d in deps)
    # nothing of a bad message left behind: the ledgers, run dirs, registry and KV hold the good ones
    await _nothing_left_but(b, tmp_path / "state", {e.replica for e in ready.values()}, cmd.id)
    print(f"fuzz seed {SEED}: {sum(sent.values())} bad messages in {time.monotonic() - t0:.1f} s")


async def _up(b: bus.Bus) -> bool:
    """The restorer beats, the scaler holds the lease, the freezer's consumer is there."""
    if not await bus.kv_get(b.kv[Bucket.HOSTS], HOST) or not await bus.kv_get(b.kv[Bucket.LEASES], LEASE_KEY):
        return False
    try:
        await b.js.consumer_info(b.subjects.cmd_stream, b.subjects.durable("freezer", Verb.FREEZE, HOST))
    except Exception:
        return False
    return True


async def _nothing_left_but(b: bus.Bus, state: Path, replicas: set[str], freeze_id: str) -> None:
    commands = state / "restorer" / "commands"
    entries = [wire.decode(p.read_bytes(), Entry, LEDGER_TYPE) for p in commands.glob("*.json")]
    assert {e.replica for e in entries} == replicas and len(entries) == len(replicas)
    assert not (commands / "quarantine").exists()
    runs = {p.name.rsplit(".", 1)[0] for p in (state / "restorer" / "run").iterdir()}
    assert runs == replicas
    assert {p.stem for p in (state / "sandboxes").glob("*.json")} == replicas
    keys = set(await b.kv[Bucket.REPLICAS].keys())
    assert {k.split(".", 1)[1] for k in keys} == replicas
    assert keys == {replica_key(k.split(".", 1)[0], k.split(".", 1)[1]) for k in keys}
    assert len(list((state / "freezer" / "done").glob("*.json"))) == 1, "only the final freeze's outcome"
    assert not list((state / "freezer" / "inflight").glob("*.json"))
    assert not list((state / "freezer" / "staging").iterdir())
    assert freeze_id
