//! Logging and tracing set-up shared by the binaries.
//!
//! Logs go to stderr as text or JSON lines, filtered by `RUST_LOG` (default `info`).
//! When `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set,
//! spans are also exported over OTLP/HTTP (protobuf); the standard `OTEL_*` variables
//! (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_BSP_*`, headers, timeouts)
//! apply. The W3C trace context travels in NATS message headers and in result bodies
//! ([`current_carrier`], [`apply_carrier`], [`extract`], [`extract_carrier`]), so one task
//! is one trace across API, worker and reconciler.
//!
//! Text logs carry ANSI colours only when stderr is a terminal. Errors are logged with
//! their causes ([`ErrorChain`]), so a failed request says where it went and why.

use async_nats::HeaderMap;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::{Layer, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// Whether spans are exported. Without an exporter there is no trace context to carry,
/// and the propagation helpers skip their work (they run once or more per task).
static EXPORTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn exporting() -> bool {
    EXPORTING.load(std::sync::atomic::Ordering::Relaxed)
}

/// Keeps the exporter alive; dropping it flushes pending spans.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.shutdown();
        }
    }
}

fn otlp_configured() -> bool {
    ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
        .iter()
        .any(|k| std::env::var(k).is_ok_and(|v| !v.is_empty()))
}

fn provider(service: &str) -> Result<SdkTracerProvider, String> {
    let exporter = opentelemetry_otlp::SpanExporter::builder().with_http().build().map_err(|e| e.to_string())?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").map_or(true, |v| v.is_empty()) {
        resource = resource.with_service_name(service.to_owned());
    }
    Ok(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource.build()).build())
}

/// Installs the global subscriber (and the OTLP exporter when configured). Call once
/// at start-up and keep the returned value until exit.
pub fn init(format: &str, service: &str) -> Telemetry {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let provider = if otlp_configured() {
        provider(service).map_err(|e| eprintln!("OTLP exporter disabled: {e}")).ok()
    } else {
        None
    };
    EXPORTING.store(provider.is_some(), std::sync::atomic::Ordering::Relaxed);
    // RUST_LOG filters the logs only: spans are exported at INFO whatever the log level.
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer(service.to_owned()))
            .with_filter(tracing_subscriber::filter::LevelFilter::INFO)
    });
    let json = format == "json";
    let logs = if json {
        tracing_subscriber::fmt::layer().json().with_writer(std::io::stderr).boxed()
    } else {
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
        tracing_subscriber::fmt::layer().with_ansi(ansi).with_writer(std::io::stderr).boxed()
    };
    let _ = tracing_subscriber::registry().with(otel).with(logs.with_filter(filter)).try_init();
    Telemetry { provider }
}

/// Displays an error followed by its causes (`source()` chain), separated by `: `, as
/// anyhow's `{:#}` does; a cause whose text its parent already ends with is not repeated.
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut written = self.0.to_string();
        f.write_str(&written)?;
        let mut cause = self.0.source();
        while let Some(c) = cause {
            let text = c.to_string();
            if !written.ends_with(&text) {
                write!(f, ": {text}")?;
                written = text;
            }
            cause = c.source();
        }
        Ok(())
    }
}

/// `e` with the user name and password removed from the URL it names, if any, so the
/// error can be logged or printed.
pub fn without_credentials(mut e: reqwest::Error) -> reqwest::Error {
    if let Some(url) = e.url_mut() {
        let _ = url.set_username("");
        let _ = url.set_password(None);
    }
    e
}

/// The exit status of `service` whose `run` returned `result`: a failure is logged with
/// its causes (through the log subscriber, so in the configured format) and exits 1.
pub fn exit_status(service: &str, result: anyhow::Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format_args!("{e:#}"), "{service} stopped");
            std::process::ExitCode::FAILURE
        }
    }
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|v| v.as_str())
    }
    fn keys(&self) -> Vec<&str> {
        Vec::new()
    }
}

pub use crate::protocol::Carrier;

struct CarrierInjector<'a>(&'a mut Carrier);

impl Injector for CarrierInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.push((key.to_owned(), value));
    }
}

/// The current span's trace context, to hand to code that publishes later.
pub fn current_carrier() -> Carrier {
    let mut carrier = Carrier::new();
    if !exporting() {
        return carrier;
    }
    TraceContextPropagator::new()
        .inject_context(&tracing::Span::current().context(), &mut CarrierInjector(&mut carrier));
    carrier
}

/// Writes a captured trace context into NATS headers.
pub fn apply_carrier(carrier: &Carrier, headers: &mut HeaderMap) {
    for (k, v) in carrier {
        headers.insert(k.as_str(), v.as_str());
    }
}

struct CarrierExtractor<'a>(&'a Carrier);

impl Extractor for CarrierExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k.eq_ignore_ascii_case(key)).map(|(_, v)| v.as_str())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_str()).collect()
    }
}

/// Makes `span` a child of the trace context in `carrier`.
pub fn extract_carrier(carrier: &Carrier, span: &tracing::Span) {
    if !exporting() {
        return;
    }
    let cx = TraceContextPropagator::new().extract(&CarrierExtractor(carrier));
    let _ = span.set_parent(cx);
}

/// Makes `span` a child of the trace context carried by `headers`, if any.
pub fn extract(headers: Option<&HeaderMap>, span: &tracing::Span) {
    if !exporting() {
        return;
    }
    if let Some(h) = headers {
        let cx = TraceContextPropagator::new().extract(&HeaderExtractor(h));
        let _ = span.set_parent(cx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] Middle);

    #[derive(Debug, thiserror::Error)]
    #[error("middle: {0}")]
    struct Middle(#[source] std::io::Error);

    #[test]
    fn error_chain_lists_each_cause_once() {
        let e = Outer(Middle(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)));
        assert_eq!(ErrorChain(&e).to_string(), "outer: middle: connection refused");
    }

    #[tokio::test]
    async fn request_errors_name_the_url_without_credentials() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let e = reqwest::get(format!("http://user:secret@{addr}/x")).await.unwrap_err();
        let text = ErrorChain(&without_credentials(e)).to_string();
        assert!(text.contains(&format!("http://{addr}/x")), "{text}");
        assert!(text.to_lowercase().contains("connection refused"), "{text}");
        assert!(!text.contains("secret") && !text.contains("user"), "{text}");
    }
}
