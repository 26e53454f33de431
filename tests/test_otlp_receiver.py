"""The loopback OTLP receiver gets what snapscale's telemetry setup exports from another process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request

import pytest
from otlp_receiver import OtlpReceiver, ancestors, children

PROBE = textwrap.dedent(
    """
    import os
    from snapscale.shared.core import telemetry
    from snapscale.shared.core.settings import Settings

    s = Settings.from_env()
    telemetry.setup("otlp-probe", s.otlp_endpoint)
    tr = telemetry.tracer("probe")
    with tr.start_as_current_span("scale_up", attributes={"snapscale.tier": "store"}):
        with tr.start_as_current_span("prefetch") as sp:
            sp.set_attribute("prefetch.bytes", 12345)
            sp.set_attribute("prefetch.cached_chunks", 3)
        with tr.start_as_current_span("criu_restore"):
            pass
    with tr.start_as_current_span("unrelated"):
        pass
    telemetry.meter("probe").create_counter("probe_events").add(2)
    telemetry.shutdown()
    """
)


def test_receives_spans_exported_by_telemetry_setup() -> None:
    with OtlpReceiver() as r:
        env = dict(os.environ, OTEL_EXPORTER_OTLP_ENDPOINT=r.endpoint)
        subprocess.run([sys.executable, "-c", PROBE], env=env, check=True, timeout=60)
        assert r.wait_for(lambda r: len(r.spans()) >= 4, timeout_s=10)
        traces = r.traces()
        assert len(traces) == 2, "the unrelated root span is its own trace"
        (main,) = [t for t in traces.values() if any(s.name == "scale_up" for s in t)]
        root = next(s for s in main if s.name == "scale_up")
        assert root.parent_span_id == ""
        assert root.service == "otlp-probe"
        assert root.attributes["snapscale.tier"] == "store"
        assert [c.name for c in children(main, root)] == ["prefetch", "criu_restore"]
        prefetch = next(s for s in main if s.name == "prefetch")
        assert prefetch.attributes == {"prefetch.bytes": 12345, "prefetch.cached_chunks": 3}
        assert ancestors(main, prefetch) == [root]
        assert root.start_ns <= prefetch.start_ns <= prefetch.end_ns <= root.end_ns
        assert root.duration_s >= 0
        # The meter provider flushes at exit.
        assert r.wait_for(lambda r: "probe_events" in r.metric_names(), timeout_s=5)


def test_rejects_what_is_not_otlp() -> None:
    with OtlpReceiver() as r:
        req = urllib.request.Request(
            f"{r.endpoint}/v1/traces", data=b"\xff\xffnot protobuf", method="POST",
            headers={"Content-Type": "application/x-protobuf"},
        )  # fmt: skip
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=5)
        assert e.value.code == 400
        assert r.rejected == 1
        assert r.spans() == []
