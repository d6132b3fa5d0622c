//! An in-process OTLP/gRPC collector (opentelemetry-proto's `TraceService` on tonic 0.14,
//! as the roles' exporter speaks) on a free loopback port: it keeps every span it
//! receives, with its resource's `service.name`, for span-tree tests.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
pub use opentelemetry_proto::tonic::common::v1::any_value::Value;
pub use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
pub use opentelemetry_proto::tonic::trace::v1::Span;

/// A received span and the `service.name` of the process that sent it.
#[derive(Debug, Clone)]
pub struct Received {
    pub service: String,
    pub span: Span,
}

#[derive(Clone, Default)]
struct Store(Arc<Mutex<Vec<Received>>>);

#[tonic::async_trait]
impl TraceService for Store {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut got = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for rs in req.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .and_then(|a| string(a.value.as_ref()?.value.as_ref()?))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                got.extend(ss.spans.into_iter().map(|span| Received { service: service.clone(), span }));
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

/// The collector; it stops with the test's runtime.
pub struct Collector {
    addr: SocketAddr,
    store: Store,
}

impl Collector {
    /// Starts one on 127.0.0.1, a free port.
    pub async fn start() -> Collector {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the OTLP collector");
        let addr = listener.local_addr().expect("collector address");
        let store = Store::default();
        let svc = TraceServiceServer::new(store.clone());
        tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            if let Err(e) = tonic::transport::Server::builder().add_service(svc).serve_with_incoming(incoming).await {
                eprintln!("OTLP collector stopped: {e}");
            }
        });
        Collector { addr, store }
    }

    /// The URL to give `--otlp-endpoint`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<Received> {
        self.store.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// A string attribute value's text.
pub fn string(v: &Value) -> Option<String> {
    match v {
        Value::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

/// A span's attribute `key`.
pub fn attr(s: &Span, key: &str) -> Option<Value> {
    s.attributes.iter().find(|a| a.key == key).and_then(|a| a.value.clone()?.value)
}

/// Lowercase hex of a trace or span id.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
