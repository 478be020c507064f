//! An OTLP trace receiver inside the test process: a real gRPC
//! `TraceService` (tonic) and a plain HTTP/1.1 `POST /v1/traces` endpoint for
//! OTLP/HTTP protobuf, both on free loopback ports, both decoding with the
//! `opentelemetry-proto` types. What natsfn exports goes through its real
//! exporter and over a real socket; nothing is mocked.
//!
//! Also here: collectors that are down (a refused port) or hung (accepts
//! connections, never answers), for the tests that natsfn never waits on
//! export.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;
use tokio::net::TcpListener;

pub use natsfn::telemetry::Protocol;

/// One span as received, with what the export said about its origin.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    /// The span itself.
    pub span: Span,
    /// The resource's `service.name`.
    pub service_name: Option<String>,
    /// The instrumentation scope's name and schema URL.
    pub scope: (String, String),
}

impl ReceivedSpan {
    /// Hex trace id.
    pub fn trace_id(&self) -> String {
        hex(&self.span.trace_id)
    }

    /// Hex span id.
    pub fn span_id(&self) -> String {
        hex(&self.span.span_id)
    }

    /// Hex parent span id, empty for a root span.
    pub fn parent_id(&self) -> String {
        hex(&self.span.parent_span_id)
    }

    /// A string attribute's value.
    pub fn str_attr(&self, key: &str) -> Option<&str> {
        attr(&self.span.attributes, key).and_then(|v| match v {
            Value::StringValue(s) => Some(s.as_str()),
            _ => None,
        })
    }

    /// An integer attribute's value.
    pub fn int_attr(&self, key: &str) -> Option<i64> {
        attr(&self.span.attributes, key).and_then(|v| match v {
            Value::IntValue(i) => Some(*i),
            _ => None,
        })
    }

    /// Whether the span has `key` at all.
    pub fn has_attr(&self, key: &str) -> bool {
        attr(&self.span.attributes, key).is_some()
    }
}

fn attr<'a>(attrs: &'a [opentelemetry_proto::tonic::common::v1::KeyValue], key: &str) -> Option<&'a Value> {
    attrs.iter().find(|kv| kv.key == key).and_then(|kv| kv.value.as_ref()).and_then(|v| v.value.as_ref())
}

/// A string attribute of a span event.
pub fn event_attr<'a>(event: &'a opentelemetry_proto::tonic::trace::v1::span::Event, key: &str) -> Option<&'a str> {
    attr(&event.attributes, key).and_then(|v| match v {
        Value::StringValue(s) => Some(s.as_str()),
        _ => None,
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Where received spans accumulate.
#[derive(Clone, Default)]
struct Sink {
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
    /// With `keep` off only the count is kept (for benchmarks).
    count: Arc<std::sync::atomic::AtomicUsize>,
    keep: bool,
}

impl Sink {
    fn take(&self, req: ExportTraceServiceRequest) {
        let mut n = 0;
        let mut kept = Vec::new();
        for rs in req.resource_spans {
            let service_name = rs.resource.as_ref().and_then(|r| {
                r.attributes.iter().find(|kv| kv.key == "service.name").and_then(|kv| kv.value.as_ref()).and_then(|v| {
                    match &v.value {
                        Some(Value::StringValue(s)) => Some(s.clone()),
                        _ => None,
                    }
                })
            });
            for ss in rs.scope_spans {
                let scope = (ss.scope.as_ref().map(|s| s.name.clone()).unwrap_or_default(), ss.schema_url.clone());
                n += ss.spans.len();
                if self.keep {
                    kept.extend(ss.spans.into_iter().map(|span| ReceivedSpan {
                        span,
                        service_name: service_name.clone(),
                        scope: scope.clone(),
                    }));
                }
            }
        }
        self.spans.lock().unwrap().extend(kept);
        self.count.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }
}

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.take(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

/// A running receiver. Dropping it stops serving.
pub struct OtlpReceiver {
    endpoint: String,
    sink: Sink,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl OtlpReceiver {
    /// Starts a receiver speaking `protocol` on a free loopback port, on the
    /// current runtime.
    pub async fn start(protocol: Protocol) -> OtlpReceiver {
        Self::start_with(protocol, true).await
    }

    /// Starts a receiver that only counts spans.
    pub async fn counting(protocol: Protocol) -> OtlpReceiver {
        Self::start_with(protocol, false).await
    }

    async fn start_with(protocol: Protocol, keep: bool) -> OtlpReceiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let sink = Sink { keep, ..Sink::default() };
        let task = match protocol {
            Protocol::Grpc => {
                let service = TraceServiceServer::new(sink.clone());
                tokio::spawn(async move {
                    let incoming = tonic::transport::server::TcpIncoming::from(listener);
                    let _ =
                        tonic::transport::Server::builder().add_service(service).serve_with_incoming(incoming).await;
                })
            }
            Protocol::HttpProtobuf => tokio::spawn(serve_http(listener, sink.clone())),
        };
        OtlpReceiver { endpoint: format!("http://{addr}"), sink, task }
    }

    /// The base URL to give natsfn's `--otlp-endpoint`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Everything received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.sink.spans.lock().unwrap().clone()
    }

    /// How many spans were received.
    pub fn count(&self) -> usize {
        self.sink.count.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits (up to 20 s) until the spans received satisfy `done`, and
    /// returns them; panics with what arrived otherwise.
    pub async fn wait_for(&self, what: &str, done: impl Fn(&[ReceivedSpan]) -> bool) -> Vec<ReceivedSpan> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let spans = self.spans();
            if done(&spans) {
                return spans;
            }
            if tokio::time::Instant::now() > deadline {
                let names: Vec<_> = spans.iter().map(|s| s.span.name.clone()).collect();
                panic!("timed out waiting for {what}; received {names:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// OTLP/HTTP protobuf: one request per export, answered with an empty
/// `ExportTraceServiceResponse`.
async fn serve_http(listener: TcpListener, sink: Sink) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        let sink = sink.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let sink = sink.clone();
                async move {
                    let ok = req.method() == hyper::Method::POST && req.uri().path() == "/v1/traces";
                    let body = req.into_body().collect().await?.to_bytes();
                    let status = match (ok, ExportTraceServiceRequest::decode(body)) {
                        (true, Ok(export)) => {
                            sink.take(export);
                            hyper::StatusCode::OK
                        }
                        (true, Err(_)) => hyper::StatusCode::BAD_REQUEST,
                        (false, _) => hyper::StatusCode::NOT_FOUND,
                    };
                    let reply = ExportTraceServiceResponse { partial_success: None }.encode_to_vec();
                    let mut response = hyper::Response::new(Full::new(Bytes::from(reply)));
                    *response.status_mut() = status;
                    response.headers_mut().insert(
                        hyper::header::CONTENT_TYPE,
                        hyper::header::HeaderValue::from_static("application/x-protobuf"),
                    );
                    Ok::<_, hyper::Error>(response)
                }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
        });
    }
}

/// A loopback URL where nothing listens: connections are refused.
pub fn refused_endpoint() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("local addr");
    drop(listener);
    format!("http://{addr}")
}

/// A collector that accepts connections and never answers: every export
/// hangs until the exporter's timeout. Serves until dropped.
pub struct HungCollector {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl HungCollector {
    /// Starts one on the current runtime.
    pub async fn start() -> HungCollector {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        HungCollector { addr, task }
    }

    /// Its base URL.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for HungCollector {
    fn drop(&mut self) {
        self.task.abort();
    }
}
