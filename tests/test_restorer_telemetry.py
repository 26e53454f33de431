"""The restorer's trace of a scale-up continues the command's trace context and carries the
span names and attributes the dashboard reads (tests/span_contract.py); time-to-ready and the
phases are histograms by tier with second-scale buckets; a background prefetch is its own span."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import span_contract as sc
from engine_helpers import kill_tagged
from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader, MetricsData
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from restorer_harness import Harness, follow, running

from snapscale.shared import bus
from snapscale.shared.bus.messages import PrefetchCommand, ReplicaState, Tier
from snapscale.shared.bus.subjects import Verb
from snapscale.shared.core import telemetry
from snapscale.shared.core.settings import Settings
from snapscale.shared.engine.criu import CriuBinary

pytestmark = pytest.mark.criu


@pytest.fixture(scope="session")
def reader() -> InMemoryMetricReader:
    r = InMemoryMetricReader()
    metrics.set_meter_provider(MeterProvider(metric_readers=[r], views=telemetry.views()))
    assert metrics.get_meter_provider().__class__ is MeterProvider, "a meter provider was installed before"
    return r


@pytest.fixture
async def h(
    s3_settings: Settings, the_bus: bus.Bus, criu: CriuBinary, tmp_path: Path
) -> AsyncIterator[Harness]:
    tag = f"rtel-{uuid.uuid4().hex[:10]}"
    harness = Harness(s3_settings, the_bus, criu, tag, tmp_path)
    async for _ in follow(harness):
        yield harness
    kill_tagged(tag)


def of_trace(exp: InMemorySpanExporter, trace_id: int) -> list[ReadableSpan]:
    return [s for s in exp.get_finished_spans() if s.context is not None and s.context.trace_id == trace_id]


async def test_scale_up_trace_and_time_to_ready(
    h: Harness, spans: InMemorySpanExporter, reader: InMemoryMetricReader
) -> None:
    spec = await h.deploy(h.spec())
    await h.make_checkpoint(spec)
    cold_spec = await h.deploy(h.spec("other"))
    tracer = telemetry.tracer("test")
    async with running(h.settings, h.criu):
        with tracer.start_as_current_span(sc.DECISION_SPAN) as decision:  # what the scaler would do
            await h.restore(spec.name, "a")
        with tracer.start_as_current_span(sc.DECISION_SPAN) as decision2:
            await h.restore(cold_spec.name, "b")
        assert (await h.wait("a")).tier is Tier.STORE
        ev_b = await h.wait("b")
        assert ev_b.state is ReplicaState.READY and ev_b.tier is Tier.COLD

    got = of_trace(spans, decision.get_span_context().trace_id)
    names = [s.name for s in got]
    (root,) = [s for s in got if s.name == sc.SCALE_UP_SPAN]
    assert root.parent is not None and root.parent.span_id == decision.get_span_context().span_id
    assert root.attributes is not None
    assert root.attributes[sc.TIER_ATTR] == "store"
    assert root.attributes[sc.DEPLOYMENT_ATTR] == spec.name and root.attributes[sc.REPLICA_ATTR] == "a"
    for phase in (*sc.RESTORE_TRACE_PHASES, "after_restore", "ready_probe"):
        assert phase in names, names
        (s,) = [s for s in got if s.name == phase]
        assert s.parent is not None and s.parent.span_id == root.context.span_id, phase
    (pf,) = [s for s in got if s.name == "prefetch"]
    assert pf.attributes is not None
    assert int(pf.attributes[sc.PREFETCH_BYTES_ATTR]) > 0  # type: ignore[arg-type]
    assert pf.attributes[sc.PREFETCH_CACHED_CHUNKS_ATTR] == 0
    assert {"prefetch.chunks", "prefetch.gbps"} <= set(pf.attributes)

    cold = of_trace(spans, decision2.get_span_context().trace_id)
    (root2,) = [s for s in cold if s.name == sc.SCALE_UP_SPAN]
    assert root2.attributes is not None and root2.attributes[sc.TIER_ATTR] == "cold"
    assert str(root2.attributes[sc.FALLBACK_ATTR]).startswith("no suspended replica; no checkpoint for key")
    assert {"lookup", *sc.COLD_PHASES} <= {s.name for s in cold}
    (launch,) = [s for s in cold if s.name == "launch"]
    assert launch.attributes is not None and launch.attributes[sc.FALLBACK_ATTR] == ev_b.reason

    data = reader.get_metrics_data()
    assert data is not None
    by_tier = {
        str(p.attributes[sc.TIER_ATTR]): p for p in points(data, sc.SCALE_UP_DURATION_METRIC) if p.attributes
    }
    assert {"store", "cold"} <= set(by_tier)
    for p in by_tier.values():
        assert p.count >= 1 and p.sum > 0
        assert set(p.attributes or {}) == sc.SCALE_UP_DURATION_LABELS
        # seconds, not the SDK's millisecond defaults (0, 5, 10, 25, ...)
        assert tuple(p.explicit_bounds) == sc.DURATION_BUCKETS_S
    phases = {(str(p.attributes["snapscale.phase"]), str(p.attributes[sc.TIER_ATTR])): p
              for p in points(data, sc.PHASE_DURATION_METRIC) if p.attributes}  # fmt: skip
    assert {(ph, "store") for ph in sc.RESTORE_TRACE_PHASES} <= set(phases), sorted(phases)
    assert {(ph, "cold") for ph in sc.COLD_PHASES} <= set(phases), sorted(phases)
    assert all(tuple(p.explicit_bounds) == sc.DURATION_BUCKETS_S for p in phases.values())


def points(data: MetricsData, name: str) -> list[HistogramDataPoint]:
    return [
        p
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        if m.name == name
        for p in m.data.data_points
        if isinstance(p, HistogramDataPoint)
    ]


async def test_background_prefetch_is_not_the_scale_up_phase(h: Harness, spans: InMemorySpanExporter) -> None:
    """A prefetch command (the scaler's warm-up at scale-to-zero) has its own span name, so the
    dashboard's `prefetch` phase holds scale-ups only."""
    spec = await h.deploy(h.spec())
    await h.make_checkpoint(spec)
    tracer = telemetry.tracer("test")
    async with running(h.settings, h.criu):
        with tracer.start_as_current_span(sc.DECISION_SPAN) as decision:
            cmd = PrefetchCommand(id=f"p-{h.tag}", deployment=spec.name, issued_at=time.time())
            await h.send(Verb.PREFETCH, cmd)
        trace_id = decision.get_span_context().trace_id
        for _ in range(300):
            if any(s.name == sc.BACKGROUND_PREFETCH_SPAN for s in of_trace(spans, trace_id)):
                break
            await asyncio.sleep(0.1)
    got = of_trace(spans, trace_id)
    (bg,) = [s for s in got if s.name == sc.BACKGROUND_PREFETCH_SPAN]
    assert bg.attributes is not None and int(bg.attributes[sc.PREFETCH_BYTES_ATTR]) > 0  # type: ignore[arg-type]
    assert "prefetch" not in {s.name for s in got}
