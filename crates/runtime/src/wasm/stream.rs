//! A WASI output stream that writes into a bounded [`CaptureSink`], or, for an SSI process, to its
//! home's console. It never blocks and never fails: past the cap, writes are accepted and dropped
//! (and counted), so a guest that floods its stdout keeps running without growing the host's memory.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

use crate::capture::CaptureSink;
use crate::ssi::SsiHost;

/// The most a guest may write in one call; it is a permit, not a buffer.
const PERMIT: usize = 64 * 1024;

#[derive(Clone)]
pub(crate) enum CapturedStream {
    Capture(CaptureSink),
    /// To the home of an SSI process, as descriptor 1 or 2.
    Home(std::sync::Arc<dyn SsiHost>, u32),
}

impl CapturedStream {
    fn put(&self, bytes: &[u8]) {
        match self {
            CapturedStream::Capture(sink) => sink.write(bytes),
            CapturedStream::Home(host, fd) => host.output(*fd, bytes),
        }
    }
}

impl IsTerminal for CapturedStream {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for CapturedStream {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl OutputStream for CapturedStream {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.put(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(PERMIT)
    }
}

#[async_trait::async_trait]
impl Pollable for CapturedStream {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for CapturedStream {
    fn poll_write(self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.put(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
