"""A small OTLP/HTTP receiver on loopback for tests: point OTEL_EXPORTER_OTLP_ENDPOINT at it.

It decodes protobuf ExportTrace/Metrics requests (gzip or not), keeps the spans, and answers
queries grouped by trace. Test-only: it validates nothing beyond what decoding needs.
"""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2

AttrValue = str | bool | int | float | bytes | list[Any] | dict[str, Any] | None


@dataclass(frozen=True)
class ReceivedSpan:
    trace_id: str  # 32 hex digits
    span_id: str  # 16 hex digits
    parent_span_id: str  # "" for a root span
    name: str
    service: str
    attributes: dict[str, AttrValue]
    start_ns: int
    end_ns: int
    links: tuple[tuple[str, str], ...] = ()  # (trace_id, span_id) of linked spans
    status_code: int = 0

    @property
    def duration_s(self) -> float:
        return (self.end_ns - self.start_ns) / 1e9


def any_value(v: common_pb2.AnyValue) -> AttrValue:
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in v.kvlist_value.values}
    out: AttrValue = getattr(v, kind)
    return out


def _attrs(kvs: Any) -> dict[str, AttrValue]:
    return {kv.key: any_value(kv.value) for kv in kvs}


def decode_traces(body: bytes) -> list[ReceivedSpan]:
    """Spans in one ExportTraceServiceRequest; raises DecodeError on garbage."""
    req = trace_service_pb2.ExportTraceServiceRequest()
    req.ParseFromString(body)
    out: list[ReceivedSpan] = []
    for rs in req.resource_spans:
        service = str(_attrs(rs.resource.attributes).get("service.name", ""))
        for ss in rs.scope_spans:
            for s in ss.spans:
                out.append(
                    ReceivedSpan(
                        trace_id=s.trace_id.hex(),
                        span_id=s.span_id.hex(),
                        parent_span_id=s.parent_span_id.hex(),
                        name=s.name,
                        service=service,
                        attributes=_attrs(s.attributes),
                        start_ns=s.start_time_unix_nano,
                        end_ns=s.end_time_unix_nano,
                        links=tuple((ln.trace_id.hex(), ln.span_id.hex()) for ln in s.links),
                        status_code=s.status.code,
                    )
                )
    return out


def decode_metric_names(body: bytes) -> list[str]:
    req = metrics_service_pb2.ExportMetricsServiceRequest()
    req.ParseFromString(body)
    return [m.name for rm in req.resource_metrics for sm in rm.scope_metrics for m in sm.metrics]


@dataclass
class _Store:
    lock: threading.Lock = field(default_factory=threading.Lock)
    spans: list[ReceivedSpan] = field(default_factory=list)
    metric_names: list[str] = field(default_factory=list)
    rejected: int = 0


class OtlpReceiver:
    """`with OtlpReceiver() as r:` serves on 127.0.0.1:<free port> until the block ends."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._store = _Store()
        self._server = ThreadingHTTPServer((host, port), _make_handler(self._store))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="otlp-receiver", daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> OtlpReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # --- queries ----------------------------------------------------------------------
    def spans(self) -> list[ReceivedSpan]:
        with self._store.lock:
            return list(self._store.spans)

    def metric_names(self) -> list[str]:
        with self._store.lock:
            return list(self._store.metric_names)

    @property
    def rejected(self) -> int:
        return self._store.rejected

    def traces(self) -> dict[str, list[ReceivedSpan]]:
        """Spans grouped by trace id, each trace's spans ordered by start time."""
        out: dict[str, list[ReceivedSpan]] = {}
        for s in self.spans():
            out.setdefault(s.trace_id, []).append(s)
        for spans in out.values():
            spans.sort(key=lambda s: s.start_ns)
        return out

    def named(self, name: str) -> list[ReceivedSpan]:
        return [s for s in self.spans() if s.name == name]

    def wait_for(
        self, predicate: Callable[[OtlpReceiver], bool], timeout_s: float = 10.0, poll_s: float = 0.05
    ) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate(self):
                return True
            time.sleep(poll_s)
        return predicate(self)


def children(trace: list[ReceivedSpan], parent: ReceivedSpan) -> Iterator[ReceivedSpan]:
    return (s for s in trace if s.parent_span_id == parent.span_id)


def ancestors(trace: list[ReceivedSpan], span: ReceivedSpan) -> list[ReceivedSpan]:
    """The chain from `span`'s parent up to the root (as far as the trace holds it)."""
    by_id = {s.span_id: s for s in trace}
    out: list[ReceivedSpan] = []
    cur = by_id.get(span.parent_span_id)
    while cur is not None and cur not in out:
        out.append(cur)
        cur = by_id.get(cur.parent_span_id)
    return out


def _make_handler(store: _Store) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass  # keep pytest output clean

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            if "protobuf" not in (self.headers.get("Content-Type") or ""):
                self._answer(415, b"only application/x-protobuf")
                return
            try:
                if self.path == "/v1/traces":
                    spans = decode_traces(body)
                    with store.lock:
                        store.spans.extend(spans)
                    reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                elif self.path == "/v1/metrics":
                    names = decode_metric_names(body)
                    with store.lock:
                        store.metric_names.extend(names)
                    reply = metrics_service_pb2.ExportMetricsServiceResponse().SerializeToString()
                elif self.path == "/v1/logs":
                    reply = b""
                else:
                    self._answer(404, b"unknown OTLP path")
                    return
            except DecodeError:
                with store.lock:
                    store.rejected += 1
                self._answer(400, b"not an OTLP protobuf request")
                return
            self._answer(200, reply, "application/x-protobuf")

        def _answer(self, code: int, body: bytes, ctype: str = "text/plain") -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler
