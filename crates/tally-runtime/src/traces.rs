//! Traces across the coordinator–shard hop: spans exported over OTLP/gRPC
//! (`otlp_endpoint`, off by default) and W3C trace context (`traceparent`)
//! carried in gRPC metadata, so that a slow public call can be followed to
//! the shard's group commit.
//!
//! Spans are `debug` level in the Tally crates, so without an exporter they
//! are disabled at their call site (no span is built); the log filter
//! (`RUST_LOG`) applies to log lines only. Injection and extraction run
//! only while [`exported`] is true.

use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer;

static EXPORTED: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported (an OTLP endpoint is configured).
pub fn exported() -> bool {
    EXPORTED.load(Ordering::Relaxed)
}

/// Exports what is buffered when dropped.
#[derive(Default)]
pub struct TracesGuard {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl std::fmt::Debug for TracesGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TracesGuard")
            .field("exporting", &self.provider.is_some())
            .finish()
    }
}

impl Drop for TracesGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = provider.shutdown();
        }
    }
}

type BoxedLayer = Box<dyn Layer<tracing_subscriber::Registry> + Send + Sync>;

/// Where and as whom a daemon exports its spans.
#[derive(Debug, Clone, Copy)]
pub struct Otlp<'a> {
    /// `service.name`: `tally-coordinator` or `tally-shard`.
    pub service: &'static str,
    /// `service.instance.id`: the node id, or the coordinator's address.
    pub instance: &'a str,
    /// The collector's OTLP/gRPC endpoint, `http://host:port`.
    pub endpoint: &'a str,
}

/// The layer that exports the Tally crates' spans as `otlp` says, and its
/// guard. Needs a tokio runtime. The resource also takes what the
/// standard `OTEL_RESOURCE_ATTRIBUTES` variable adds.
pub(crate) fn exporter(otlp: Otlp<'_>) -> Result<(BoxedLayer, TracesGuard), String> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(otlp.endpoint)
        .build()
        .map_err(|error| format!("OTLP exporter for {}: {error}", otlp.endpoint))?;
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(otlp.service)
                .with_attribute(opentelemetry::KeyValue::new(
                    "service.instance.id",
                    otlp.instance.to_string(),
                ))
                .build(),
        )
        .build();
    let targets = tracing_subscriber::filter::Targets::new()
        .with_target("tally_coordinator", tracing::Level::DEBUG)
        .with_target("tally_shard", tracing::Level::DEBUG);
    let layer = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("tally"))
        .with_filter(targets)
        .boxed();
    Ok((
        layer,
        TracesGuard {
            provider: Some(provider),
        },
    ))
}

/// Turns propagation on, once the exporting subscriber is installed.
pub(crate) fn start_propagating() {
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    EXPORTED.store(true, Ordering::Relaxed);
}

/// Puts the current span's trace context into `metadata` (`traceparent`),
/// if spans are exported.
pub fn inject(metadata: &mut tonic::metadata::MetadataMap) {
    if !exported() {
        return;
    }
    let context = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&context, &mut MetadataInjector(metadata));
    });
}

/// Makes the trace context in `metadata` (a caller's `traceparent`) the
/// parent of `span`, if spans are exported.
pub fn adopt(span: &tracing::Span, metadata: &tonic::metadata::MetadataMap) {
    if !exported() {
        return;
    }
    let parent = opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.extract(&MetadataExtractor(metadata))
    });
    let _ = span.set_parent(parent);
}

/// Links `span` to `other` (a span that is not its parent: another public
/// call whose increments share its internal call), if spans are exported.
pub fn link(span: &tracing::Span, other: &tracing::Span) {
    if !exported() {
        return;
    }
    use opentelemetry::trace::TraceContextExt;
    let context = other.context();
    let other = context.span().span_context().clone();
    if other.is_valid() {
        span.add_link(other);
    }
}

/// Writes trace context into gRPC metadata (its keys are header names).
struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        let (Ok(key), Ok(value)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::MetadataValue::try_from(value.as_str()),
        ) else {
            return;
        };
        self.0.insert(key, value);
    }
}

/// Reads trace context from gRPC metadata.
struct MetadataExtractor<'a>(&'a tonic::metadata::MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|key| match key {
                tonic::metadata::KeyRef::Ascii(key) => Some(key.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}
