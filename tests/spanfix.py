"""Spans this test process ends, kept in memory, whoever installed the tracer provider first:
`memory_spans()` from the moment it is called (conftest.py's `spans` fixture: one per module).
"""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from snapscale.shared.core import telemetry


def memory_spans() -> InMemorySpanExporter:
    """Spans of this process into memory from now on, whether or not another test set a provider up."""
    mem = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        provider.add_span_processor(SimpleSpanProcessor(mem))
    else:
        telemetry.setup("snapscale-tests", None, exporter=mem)
    return mem
