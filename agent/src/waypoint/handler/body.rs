//! Request bodies (buffered for replay, or streamed once) and a response body that reports its size
//! when it ends, so request metrics carry the bytes actually sent.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body as _, Frame, Incoming, SizeHint};

use super::super::server::{Body, BoxError};
use super::MAX_BUFFERED_BODY;

/// A request body: replayable when small, else usable once.
pub(crate) struct RequestBody {
    buffered: Option<Bytes>,
    stream: Option<Incoming>,
    /// Known size (buffered length or Content-Length), for metrics.
    pub len: Option<u64>,
}

impl RequestBody {
    /// Buffers bodies known to be at most `MAX_BUFFERED_BODY`; others stream through.
    pub async fn read(body: Incoming) -> Result<RequestBody, hyper::Error> {
        if body.is_end_stream() {
            return Ok(RequestBody { buffered: Some(Bytes::new()), stream: None, len: Some(0) });
        }
        match body.size_hint().exact() {
            Some(n) if n <= MAX_BUFFERED_BODY => {
                let bytes = body.collect().await?.to_bytes();
                let len = Some(bytes.len() as u64);
                Ok(RequestBody { buffered: Some(bytes), stream: None, len })
            }
            exact => Ok(RequestBody { buffered: None, stream: Some(body), len: exact }),
        }
    }

    pub fn replayable(&self) -> bool {
        self.buffered.is_some()
    }

    /// The body for one attempt; `None` once a streamed body was used.
    pub fn take(&mut self) -> Option<Body> {
        if let Some(b) = &self.buffered {
            return Some(Full::new(b.clone()).map_err(|never| match never {}).boxed());
        }
        self.stream.take().map(|s| s.map_err(|e| Box::new(e) as BoxError).boxed())
    }

    /// A copy for a mirror (buffered bodies only).
    pub fn copy(&self) -> Option<Body> {
        self.buffered.as_ref().map(|b| Full::new(b.clone()).map_err(|never| match never {}).boxed())
    }
}

/// Calls `done(bytes)` once, when the body ended or was dropped.
pub(crate) struct Finishing<B> {
    inner: B,
    bytes: u64,
    done: Option<Box<dyn FnOnce(u64) + Send + Sync>>,
}

impl<B> Finishing<B> {
    pub fn new(inner: B, done: Box<dyn FnOnce(u64) + Send + Sync>) -> Self {
        Finishing { inner, bytes: 0, done: Some(done) }
    }

    fn finish(&mut self) {
        if let Some(done) = self.done.take() {
            done(self.bytes);
        }
    }
}

impl<B> hyper::body::Body for Finishing<B>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let res = std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match &res {
            Some(Ok(f)) => {
                if let Some(d) = f.data_ref() {
                    self.bytes += d.len() as u64;
                }
                if self.inner.is_end_stream() {
                    self.finish();
                }
            }
            _ => self.finish(),
        }
        Poll::Ready(res)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for Finishing<B> {
    fn drop(&mut self) {
        self.finish();
    }
}
