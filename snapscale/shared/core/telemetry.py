"""OpenTelemetry setup and trace-context propagation through NATS headers.

OTLP/HTTP export only when OTEL_EXPORTER_OTLP_ENDPOINT is set; otherwise spans are recorded
for nobody. Tests pass their own span exporter.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

from opentelemetry import context, metrics, propagate, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter

_provider: TracerProvider | None = None


def setup(
    service_name: str,
    otlp_endpoint: str | None,
    *,
    exporter: SpanExporter | None = None,
    metric_reader: MetricReader | None = None,
) -> TracerProvider:
    """Install a tracer (and meter) provider for this process. Safe to call once per process."""
    global _provider
    resource = Resource.create({"service.name": service_name})
    provider = TracerProvider(resource=resource)
    readers: list[MetricReader] = [metric_reader] if metric_reader else []
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    elif otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        # The exporters read OTEL_EXPORTER_OTLP_* themselves (signal paths, headers, timeouts).
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(), schedule_delay_millis=500))
        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter(), export_interval_millis=5000))
    trace.set_tracer_provider(provider)
    if readers:
        metrics.set_meter_provider(MeterProvider(resource=resource, metric_readers=readers))
    _provider = provider
    return provider


def shutdown() -> None:
    if _provider is not None:
        _provider.force_flush(5000)
        _provider.shutdown()


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


def meter(name: str) -> metrics.Meter:
    return metrics.get_meter(name)


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
