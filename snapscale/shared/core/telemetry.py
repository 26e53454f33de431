"""OpenTelemetry setup and trace-context propagation through NATS headers.

OTLP/HTTP export only when OTEL_EXPORTER_OTLP_ENDPOINT is set; otherwise spans are recorded
for nobody. Tests pass their own span exporter. Metrics go one way: pulled from a Prometheus
`/metrics` endpoint when SNAPSCALE_METRICS_PORT opens one, else pushed over OTLP, never both, so a
Prometheus that also takes the collector's OTLP does not count a scale-up twice.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping

from opentelemetry import context, metrics, propagate, trace
from opentelemetry.sdk.metrics import Histogram, MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter

# Bucket boundaries of every histogram in seconds. A scale-up's phases take from tens of
# milliseconds (a resume's ready probe) to minutes (a large model's cold boot); the SDK's default
# boundaries (0, 5, 10, 25 ... 10000) are meant for milliseconds and put 0.5-30 s in two buckets.
DURATION_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0, 300.0)

_provider: TracerProvider | None = None
_metrics_server: Callable[[], None] | None = None


def views() -> list[View]:
    """The views every meter provider of snapscale gets: second-scale buckets for durations."""
    return [
        View(
            instrument_type=Histogram,
            instrument_unit="s",
            aggregation=ExplicitBucketHistogramAggregation(DURATION_BUCKETS_S),
        )
    ]


def setup(
    service_name: str,
    otlp_endpoint: str | None,
    *,
    exporter: SpanExporter | None = None,
    metric_reader: MetricReader | None = None,
    metrics_address: tuple[str, int] | None = None,
) -> TracerProvider:
    """Install a tracer (and meter) provider for this process. Safe to call once per process.

    `metrics_address` (host, port) serves the metrics on `/metrics` there for Prometheus to scrape;
    OTLP then carries spans only."""
    global _provider
    resource = Resource.create({"service.name": service_name})
    provider = TracerProvider(resource=resource)
    readers: list[MetricReader] = [metric_reader] if metric_reader else []
    if metrics_address is not None:
        readers.append(_serve_metrics(*metrics_address))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    elif otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        # The exporters read OTEL_EXPORTER_OTLP_* themselves (signal paths, headers, timeouts).
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(), schedule_delay_millis=500))
        if metrics_address is None:
            readers.append(PeriodicExportingMetricReader(OTLPMetricExporter(), export_interval_millis=5000))
    trace.set_tracer_provider(provider)
    if readers:
        metrics.set_meter_provider(MeterProvider(resource=resource, metric_readers=readers, views=views()))
    _provider = provider
    return provider


def _serve_metrics(host: str, port: int) -> MetricReader:
    """The OTel SDK's Prometheus reader behind prometheus_client's HTTP server on host:port.

    The SDK's own exporter rather than prometheus_client's instruments: the services record once,
    through OTel, and the same instruments, views and names reach OTLP and Prometheus alike."""
    global _metrics_server
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from prometheus_client import start_http_server

    reader = PrometheusMetricReader()
    server, _thread = start_http_server(port, addr=host)
    _metrics_server = server.shutdown
    return reader


def shutdown() -> None:
    global _metrics_server
    if _provider is not None:
        _provider.force_flush(5000)
        _provider.shutdown()
    if _metrics_server is not None:
        _metrics_server()
        _metrics_server = None


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


def meter(name: str) -> metrics.Meter:
    return metrics.get_meter(name)


class Totals:
    """Counts by one attribute's value since the process started, reported as an observable counter
    rather than through `add()`: every value in `keys` is reported from the first scrape on, at 0,
    and a new value from its first count, so `increase()` sees the first one (Prometheus cannot see
    the first increment of a series that appears with it)."""

    def __init__(self, attr: str, keys: Iterable[str] = ()) -> None:
        self.attr = attr
        self.counts: dict[str, int] = dict.fromkeys(keys, 0)

    def add(self, key: str, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n

    def observe(self, _options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
        return [metrics.Observation(n, {self.attr: k}) for k, n in sorted(self.counts.items())]


def observable_totals(
    m: metrics.Meter, name: str, attr: str, *, unit: str, description: str, keys: Iterable[str] = ()
) -> Totals:
    """A `Totals` by `attr`, exported as the observable counter `name` of meter `m`."""
    totals = Totals(attr, keys)
    m.create_observable_counter(name, callbacks=[totals.observe], unit=unit, description=description)
    return totals


def inject(headers: dict[str, str]) -> dict[str, str]:
    """Add the current trace context (traceparent) to message headers."""
    propagate.inject(headers)
    return headers


def extract(headers: Mapping[str, str] | None) -> context.Context:
    return propagate.extract(dict(headers or {}))


@contextlib.contextmanager
def continued(headers: Mapping[str, str] | None) -> Iterator[None]:
    """Make the trace context carried by `headers` current for the block."""
    token = context.attach(extract(headers))
    try:
        yield
    finally:
        context.detach(token)
