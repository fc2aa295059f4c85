"""OpenTelemetry tracing of the shard's RPCs (`lorax-server serve --otlp-endpoint URL`), as upstream.

Spans go to an OTLP/gRPC collector at URL under the service name `lorax.server-RANK`. OpenTelemetry is
optional: without `opentelemetry-sdk` and `opentelemetry-exporter-otlp-proto-grpc` the server logs a
warning and serves untraced. With `opentelemetry-instrumentation-grpc` too, every RPC is a server span
(the instrumentor adds its interceptor to each `grpc.server` made afterwards, so call this before the
server starts); without it, only the tracer provider is set up (spans a caller makes are exported).
"""

import logging

logger = logging.getLogger(__name__)


def setup_tracing(shard, otlp_endpoint: str) -> bool:
    """Exports spans to `otlp_endpoint`; returns whether tracing is on (False, after a warning, when
    OpenTelemetry is not installed)."""
    try:
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as error:
        logger.warning("--otlp-endpoint %s: OpenTelemetry is not installed (%s); serving without tracing "
                       "(pip install opentelemetry-sdk opentelemetry-exporter-otlp-proto-grpc "
                       "opentelemetry-instrumentation-grpc to trace)", otlp_endpoint, error)
        return False
    provider = TracerProvider(resource=Resource.create(attributes={"service.name": f"lorax.server-{shard}"}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint, insecure=True)))
    trace.set_tracer_provider(provider)
    try:
        from opentelemetry.instrumentation.grpc import GrpcInstrumentorServer
    except ImportError:
        logger.warning("--otlp-endpoint %s: opentelemetry-instrumentation-grpc is not installed: RPCs make no "
                       "spans", otlp_endpoint)
    else:
        instrumentor = GrpcInstrumentorServer()
        if not instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.instrument()
    logger.info("tracing to %s as lorax.server-%s", otlp_endpoint, shard)
    return True
