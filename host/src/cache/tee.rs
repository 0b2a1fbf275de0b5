//! A body that streams to the client while keeping a copy for the store.
//!
//! The client is never held back: every frame is passed on as it comes
//! (the copy is a reference count on `Bytes`, not a memcpy). When the body
//! ends cleanly the collected bytes go to `on_complete`; past `limit`, or on
//! an error, the copy is dropped and the body simply streams on.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};

use crate::body::{BoxError, ProxyBody};

/// Called once with the whole body when it ended cleanly within the limit.
pub type OnComplete = Box<dyn FnOnce(Bytes) + Send>;

/// Marks (in a response's extensions) a response whose body is being teed
/// into the store: a caller that does not send the body on (a `304`, a
/// `416`, the end of a range) reads it in the background instead, so the
/// store still gets the whole object.
#[derive(Debug, Clone, Copy)]
pub struct Storing;

/// Is this response's body being stored (see [`Storing`])?
pub fn is_storing(ext: &http::Extensions) -> bool {
    ext.get::<Storing>().is_some()
}

/// A body the client will not get: read to its end in the background when
/// it is being stored, else dropped.
pub fn finish_in_background(ext: &http::Extensions, body: ProxyBody) {
    if is_storing(ext) && !body.is_end_stream() {
        tokio::spawn(drain(body));
    }
}

/// Read a body to its end (so a tee stores it), discarding it.
pub async fn drain(mut body: ProxyBody) {
    use http_body_util::BodyExt;
    while let Some(frame) = body.frame().await {
        if frame.is_err() {
            break;
        }
    }
}

/// See the module doc.
pub struct TeeBody {
    inner: ProxyBody,
    chunks: Vec<Bytes>,
    len: u64,
    limit: u64,
    on_complete: Option<OnComplete>,
}

impl TeeBody {
    /// Tee `inner`; keep at most `limit` bytes.
    pub fn new(inner: ProxyBody, limit: u64, on_complete: OnComplete) -> TeeBody {
        let mut tee = TeeBody {
            inner,
            chunks: Vec::new(),
            len: 0,
            limit,
            on_complete: Some(on_complete),
        };
        // An empty body may never be polled: complete it now.
        if tee.inner.is_end_stream() {
            tee.complete();
        }
        tee
    }

    fn complete(&mut self) {
        if let Some(done) = self.on_complete.take() {
            let body = match self.chunks.len() {
                0 => Bytes::new(),
                1 => self.chunks.pop().unwrap_or_default(),
                _ => {
                    let mut all = BytesMut::with_capacity(self.len as usize);
                    for c in self.chunks.drain(..) {
                        all.extend_from_slice(&c);
                    }
                    all.freeze()
                }
            };
            done(body);
        }
    }

    fn abandon(&mut self) {
        self.on_complete = None;
        self.chunks = Vec::new();
    }
}

impl Body for TeeBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), true) = (frame.data_ref(), this.on_complete.is_some()) {
                    this.len += data.len() as u64;
                    if this.len > this.limit {
                        this.abandon();
                    } else {
                        this.chunks.push(data.clone());
                    }
                }
                // hyper stops polling once the body says it ended.
                if this.inner.is_end_stream() {
                    this.complete();
                }
            }
            Poll::Ready(Some(Err(_))) => this.abandon(),
            Poll::Ready(None) => this.complete(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};
    use std::sync::{Arc, Mutex};

    fn chunks(parts: &[&'static str]) -> ProxyBody {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = parts
            .iter()
            .map(|p| Ok(Frame::data(Bytes::from_static(p.as_bytes()))))
            .collect();
        crate::body::boxed(StreamBody::new(futures_util::stream::iter(frames)))
    }

    async fn run(parts: &[&'static str], limit: u64) -> (Bytes, Option<Bytes>) {
        let got = Arc::new(Mutex::new(None));
        let g = got.clone();
        let tee = TeeBody::new(
            chunks(parts),
            limit,
            Box::new(move |b| *g.lock().unwrap() = Some(b)),
        );
        let out = tee.collect().await.unwrap().to_bytes();
        let stored = got.lock().unwrap().take();
        (out, stored)
    }

    #[tokio::test]
    async fn streams_and_stores_within_the_limit() {
        let (out, stored) = run(&["ab", "cd", "e"], 10).await;
        assert_eq!(&out[..], b"abcde");
        assert_eq!(stored.as_deref(), Some(&b"abcde"[..]));
    }

    #[tokio::test]
    async fn past_the_limit_it_streams_but_stores_nothing() {
        let (out, stored) = run(&["ab", "cd", "e"], 4).await;
        assert_eq!(&out[..], b"abcde");
        assert!(stored.is_none());
    }

    #[tokio::test]
    async fn an_empty_body_is_stored_at_once() {
        let (out, stored) = run(&[], 4).await;
        assert!(out.is_empty());
        assert_eq!(stored.as_deref(), Some(&b""[..]));
    }
}
