//! Logs and traces for kiln's daemons.
//!
//! - Logs: `tracing` events to stderr as text or JSON lines, filtered by `RUST_LOG` (the
//!   `tracing-subscriber` directive syntax; default `info`).
//! - Traces: when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is
//!   set, spans are exported over OTLP, by gRPC or HTTP/protobuf as
//!   `OTEL_EXPORTER_OTLP_PROTOCOL` (or `..._TRACES_PROTOCOL`) says (default `grpc`); the
//!   service is named by `OTEL_SERVICE_NAME` or the daemon. Unset, no exporter exists and
//!   spans cost what a disabled `tracing` span costs.
//! - Span attributes: integers are recorded as `i64` (tracing-opentelemetry exports `u64`
//!   values as strings).
//! - Context: W3C `traceparent`/`tracestate`, taken from incoming HTTP requests and gRPC
//!   metadata and put into outgoing gRPC metadata, so a request is one trace across router
//!   and worker.

pub mod heap;

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<LogFormat, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(format!("unknown log format `{s}` (text, json)")),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("RUST_LOG: {0}")]
    Filter(String),
    #[error("unknown OTLP protocol `{0}` (grpc, http/protobuf)")]
    Protocol(String),
    #[error("cannot build the OTLP exporter: {0}")]
    Exporter(String),
    #[error("a logger is already installed")]
    AlreadyInstalled,
}

/// Flushes and stops trace export when dropped: keep it until the daemon exits.
#[must_use = "dropping it stops trace export"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            // Spans of the last requests are still queued: export them before exit.
            let _ = p.shutdown();
        }
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().map(|v| v.trim().to_string()).filter(|v| !v.is_empty())
}

/// Whether OTLP trace export is configured by the environment.
fn otlp_configured() -> bool {
    let disabled = env("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"))
        || env("OTEL_TRACES_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("none"));
    !disabled && (env("OTEL_EXPORTER_OTLP_ENDPOINT").is_some() || env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some())
}

fn provider(service: &str) -> Result<SdkTracerProvider, Error> {
    let protocol = env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL").or_else(|| env("OTEL_EXPORTER_OTLP_PROTOCOL")).unwrap_or_else(|| "grpc".into());
    let exporter = match protocol.as_str() {
        // The endpoint and headers come from the OTEL_EXPORTER_OTLP_* variables.
        "grpc" => opentelemetry_otlp::SpanExporter::builder().with_tonic().build(),
        "http/protobuf" => opentelemetry_otlp::SpanExporter::builder().with_http().with_protocol(opentelemetry_otlp::Protocol::HttpBinary).build(),
        other => return Err(Error::Protocol(other.to_string())),
    }
    .map_err(|e| Error::Exporter(e.to_string()))?;
    let mut resource = Resource::builder();
    if env("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(service.to_string());
    }
    Ok(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource.build()).build())
}

/// Installs the process's logger and, when configured, the trace exporter. `service` names
/// the daemon in traces unless OTEL_SERVICE_NAME does. Call it inside the Tokio runtime the
/// daemon serves on (the gRPC exporter's connection lives there).
pub fn init(service: &str, format: LogFormat) -> Result<Telemetry, Error> {
    let filter = match env("RUST_LOG") {
        Some(directives) => EnvFilter::try_new(&directives).map_err(|e| Error::Filter(e.to_string()))?,
        // The HTTP and gRPC stacks log connection details at info and below.
        None => EnvFilter::new("info,h2=warn,hyper=warn,hyper_util=warn,tower=warn,tonic=warn,rmcp=warn"),
    };
    let fmt = match format {
        LogFormat::Text => {
            // Colours only on a terminal: log files and collectors get plain text.
            let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
            tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_target(false).with_ansi(ansi).boxed()
        }
        LogFormat::Json => tracing_subscriber::fmt::layer().json().with_writer(std::io::stderr).with_current_span(true).boxed(),
    };
    let provider = if otlp_configured() { Some(provider(service)?) } else { None };
    let otel = provider.as_ref().map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("kiln")));
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    tracing_subscriber::registry().with(filter).with(fmt).with(otel).try_init().map_err(|_| Error::AlreadyInstalled)?;
    Ok(Telemetry { provider })
}

struct HeaderCarrier<'a>(&'a http::HeaderMap);

impl Extractor for HeaderCarrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct MetadataCarrier<'a>(&'a tonic::metadata::MetadataMap);

impl Extractor for MetadataCarrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        // A value that is not valid metadata is left out rather than sent broken.
        if let (Ok(k), Ok(v)) = (tonic::metadata::MetadataKey::from_bytes(key.as_bytes()), value.parse()) {
            self.0.insert(k, v);
        }
    }
}

/// Makes `span` a child of the trace context in an incoming HTTP request's headers (a
/// client's `traceparent`), if there is one.
pub fn continue_from_http(span: &tracing::Span, headers: &http::HeaderMap) {
    let cx = opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderCarrier(headers)));
    // Fails only when the span is disabled: nothing to parent then.
    let _ = span.set_parent(cx);
}

/// Makes `span` a child of the trace context in incoming gRPC metadata, if there is one.
pub fn continue_from_grpc(span: &tracing::Span, metadata: &tonic::metadata::MetadataMap) {
    let cx = opentelemetry::global::get_text_map_propagator(|p| p.extract(&MetadataCarrier(metadata)));
    let _ = span.set_parent(cx);
}

/// Puts `span`'s trace context into outgoing gRPC metadata, so the callee's spans join it.
pub fn propagate_to_grpc(span: &tracing::Span, metadata: &mut tonic::metadata::MetadataMap) {
    let cx = span.context();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut MetadataInjector(metadata)));
}

/// The W3C trace id of `span` as 32 hex digits, when it is being traced.
pub fn trace_id(span: &tracing::Span) -> Option<String> {
    use opentelemetry::trace::TraceContextExt as _;
    let cx = span.context();
    let id = cx.span().span_context().trace_id();
    (id != opentelemetry::trace::TraceId::INVALID).then(|| id.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_formats_parse() {
        assert_eq!("json".parse::<LogFormat>(), Ok(LogFormat::Json));
        assert!("xml".parse::<LogFormat>().unwrap_err().contains("text, json"));
    }

    #[test]
    fn metadata_carries_trace_context_both_ways() {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        let mut headers = http::HeaderMap::new();
        headers.insert("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".parse().unwrap());
        let cx = opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderCarrier(&headers)));
        let mut md = tonic::metadata::MetadataMap::new();
        opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut MetadataInjector(&mut md)));
        assert_eq!(md.get("traceparent").unwrap().to_str().unwrap(), "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        let back = opentelemetry::global::get_text_map_propagator(|p| p.extract(&MetadataCarrier(&md)));
        use opentelemetry::trace::TraceContextExt as _;
        assert_eq!(back.span().span_context().trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
    }
}
