//! natsfn's spans, made with the OpenTelemetry SDK directly: [`Tracer`] is
//! where they go, [`Trace`] is one live span (an invocation or a host call)
//! with the few things natsfn does to it.
//!
//! natsfn first made `tracing` spans and let `tracing-opentelemetry` turn
//! them into OpenTelemetry ones. That cost every invocation the subscriber
//! registry, per-layer filtering and a conversion of each field into an
//! attribute: about three times what the same spans cost built here, where
//! attribute keys are static and per-handler values are shared, not copied
//! (BENCHMARKS.md, "Tracing on and off").
//! Guest log lines still go to `tracing` as log lines; they become events of
//! the invocation's span here.

use std::borrow::Cow;
use std::sync::Arc;

use async_nats::HeaderMap;
use opentelemetry::trace::{SpanKind, Status, TraceContextExt, Tracer as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::trace::SdkTracer;

/// Where natsfn's spans go. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Tracer {
    inner: Arc<SdkTracer>,
}

impl Tracer {
    /// natsfn's spans, made by `tracer`: [`super::OtlpPipeline::tracer`],
    /// or one from an embedder's own provider.
    pub fn new(tracer: SdkTracer) -> Self {
        Tracer { inner: Arc::new(tracer) }
    }

    /// Starts a span as a child of `parent` (an empty context makes it the
    /// root of a new trace).
    pub(crate) fn start(
        &self,
        name: impl Into<Cow<'static, str>>,
        kind: SpanKind,
        attributes: Vec<KeyValue>,
        parent: &Context,
    ) -> Trace {
        let builder = self.inner.span_builder(name).with_kind(kind).with_attributes(attributes);
        let span = self.inner.build_with_context(builder, parent);
        Trace { tracer: self.clone(), cx: parent.with_span(span) }
    }
}

/// One live span and the tracer that made it, so host calls can start its
/// children. Cloning shares the span; it ends at [`Trace::end`], or when the
/// last clone is dropped.
#[derive(Clone, Debug)]
pub(crate) struct Trace {
    tracer: Tracer,
    cx: Context,
}

impl Trace {
    /// Starts a child span.
    pub(crate) fn child(&self, name: impl Into<Cow<'static, str>>, kind: SpanKind, attributes: Vec<KeyValue>) -> Trace {
        self.tracer.start(name, kind, attributes, &self.cx)
    }

    /// The context holding the span: what guest output reads as current.
    pub(crate) fn context(&self) -> &Context {
        &self.cx
    }

    pub(crate) fn set(&self, attribute: KeyValue) {
        self.cx.span().set_attribute(attribute);
    }

    /// Marks the span failed: `error.type` and an error status with
    /// `description`.
    pub(crate) fn fail(&self, error_type: &'static str, description: impl Into<Cow<'static, str>>) {
        let span = self.cx.span();
        span.set_attribute(KeyValue::new(super::key::ERROR_TYPE, error_type));
        span.set_status(Status::error(description));
    }

    pub(crate) fn event(&self, name: impl Into<Cow<'static, str>>, attributes: Vec<KeyValue>) {
        self.cx.span().add_event(name, attributes);
    }

    /// Writes this span's context into `headers`, so whoever receives the
    /// message continues the trace from here.
    pub(crate) fn inject(&self, headers: &mut HeaderMap) {
        super::propagation::inject(&self.cx, headers);
    }

    /// Ends the span now. A span kept alive by a reused instance's store
    /// would otherwise end only when the next invocation replaces it.
    pub(crate) fn end(&self) {
        self.cx.span().end();
    }
}

/// The context of the invocation running on this thread, when it is
/// traced. Guest stdout and stderr are written from inside the call through
/// WASI streams that know nothing of the invocation, so dispatch makes the
/// invocation's context current while it polls.
pub(crate) fn current() -> Option<Context> {
    let cx = Context::current();
    cx.has_active_span().then_some(cx)
}
