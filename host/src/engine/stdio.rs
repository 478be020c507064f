//! Guest stdout and stderr, routed into the host log line by line and tagged
//! with the handler and tenant (and trace ids when traced), so `println!` in
//! a guest is useful while debugging and harmless in production (lines are
//! length-capped).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

use crate::bindings::natsfn::host::log::Level;
use crate::hostcalls::guest_line;
use crate::limits::MAX_LOG_LINE;
use crate::manifest::Manifest;
use crate::telemetry;
use crate::tenant::Tenant;

/// Which guest stream a line came from; stderr lines log at `warn`.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Stream {
    Stdout,
    Stderr,
}

/// A WASI stdout/stderr that logs complete lines.
#[derive(Clone)]
pub(crate) struct GuestOutput {
    manifest: Arc<Manifest>,
    /// Whose log budget the lines come out of.
    tenant: Arc<Tenant>,
    stream: Stream,
}

impl GuestOutput {
    pub(crate) fn new(manifest: Arc<Manifest>, tenant: Arc<Tenant>, stream: Stream) -> Self {
        GuestOutput { manifest, tenant, stream }
    }
}

impl IsTerminal for GuestOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestOutput {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(LineWriter::new(self.clone()))
    }

    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(LineWriter::new(self.clone()))
    }
}

/// Buffers guest output until a newline, then logs the line. What is left
/// without a newline is logged when the stream is dropped with the instance.
struct LineWriter {
    out: GuestOutput,
    buf: Vec<u8>,
}

impl LineWriter {
    fn new(out: GuestOutput) -> Self {
        LineWriter { out, buf: Vec::new() }
    }

    fn push(&mut self, mut bytes: &[u8]) {
        while let Some(nl) = bytes.iter().position(|b| *b == b'\n') {
            self.buf.extend_from_slice(&bytes[..nl]);
            self.emit();
            bytes = &bytes[nl + 1..];
        }
        // A guest writing megabytes without a newline must not grow the
        // buffer without bound: keep the head of the line, drop the rest.
        let room = MAX_LOG_LINE.saturating_sub(self.buf.len());
        self.buf.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }

    fn emit(&mut self) {
        if !self.out.tenant.may_log() {
            self.buf.clear();
            return;
        }
        let line = String::from_utf8_lossy(&self.buf);
        let line = line.trim_end_matches('\r');
        let (level, stream) = match self.out.stream {
            Stream::Stdout => (Level::Info, "stdout"),
            Stream::Stderr => (Level::Warn, "stderr"),
        };
        // Guest writes happen while dispatch polls the invocation, with its
        // span's context current.
        let trace = telemetry::current();
        guest_line(level, line, &self.out.manifest, Some(stream), trace.as_ref());
        self.buf.clear();
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        if !self.buf.is_empty() {
            self.emit();
        }
    }
}

impl OutputStream for LineWriter {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.push(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(MAX_LOG_LINE)
    }
}

#[async_trait::async_trait]
impl Pollable for LineWriter {
    async fn ready(&mut self) {}
}

impl AsyncWrite for LineWriter {
    fn poll_write(self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.get_mut().push(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
