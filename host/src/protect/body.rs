//! The client's request body on its way upstream, counted: past the
//! route's limit the stream fails (and the client gets `413`); a body that
//! breaks (bad chunked framing, a client gone mid-body) is told apart from
//! an upstream failure (the client gets `400`, not `502`).

use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use crate::body::BoxError;

/// How the body ended, shared with the proxy that reads it after forwarding.
#[derive(Debug, Default)]
pub struct BodyVerdict(AtomicU8);

/// The body went past its limit.
const TOO_LARGE: u8 = 1;
/// The client's body stream failed.
const BROKEN: u8 = 2;

impl BodyVerdict {
    /// Did the body go past its limit?
    pub fn too_large(&self) -> bool {
        self.0.load(Ordering::Relaxed) == TOO_LARGE
    }

    /// Did the client's body stream fail?
    pub fn broken(&self) -> bool {
        self.0.load(Ordering::Relaxed) == BROKEN
    }
}

/// The error a body over its limit fails with.
#[derive(Debug, thiserror::Error)]
#[error("request body over the limit of {0} bytes")]
pub struct TooLarge(pub u64);

/// A request body that fails past `limit` bytes and records how it ended.
pub struct LimitedBody<B> {
    inner: B,
    limit: Option<u64>,
    seen: u64,
    verdict: Arc<BodyVerdict>,
}

impl<B> LimitedBody<B> {
    /// Wrap `inner`; `limit: None` only records breakage.
    pub fn new(inner: B, limit: Option<u64>) -> (LimitedBody<B>, Arc<BodyVerdict>) {
        let verdict = Arc::new(BodyVerdict::default());
        let body = LimitedBody {
            inner,
            limit,
            seen: 0,
            verdict: verdict.clone(),
        };
        (body, verdict)
    }
}

impl<B> Body for LimitedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.seen += data.len() as u64;
                    if let Some(limit) = this.limit {
                        if this.seen > limit {
                            this.verdict.0.store(TOO_LARGE, Ordering::Relaxed);
                            super::count_rejection("body_too_large");
                            return Poll::Ready(Some(Err(TooLarge(limit).into())));
                        }
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.verdict.0.store(BROKEN, Ordering::Relaxed);
                Poll::Ready(Some(Err(e.into())))
            }
            other => other.map_err(Into::into),
        }
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
    use http_body_util::{BodyExt, Full, StreamBody};

    #[tokio::test]
    async fn over_the_limit_fails_and_says_so() {
        let (b, v) = LimitedBody::new(Full::new(Bytes::from_static(b"0123456789")), Some(9));
        assert!(b.collect().await.is_err());
        assert!(v.too_large() && !v.broken());
        let (b, v) = LimitedBody::new(Full::new(Bytes::from_static(b"0123456789")), Some(10));
        assert_eq!(b.collect().await.unwrap().to_bytes().len(), 10);
        assert!(!v.too_large() && !v.broken());
    }

    #[tokio::test]
    async fn a_broken_body_is_recorded() {
        let frames: Vec<Result<Frame<Bytes>, std::io::Error>> = vec![
            Ok(Frame::data(Bytes::from_static(b"ab"))),
            Err(std::io::Error::other("bad chunk")),
        ];
        let (b, v) = LimitedBody::new(StreamBody::new(futures_util::stream::iter(frames)), None);
        assert!(b.collect().await.is_err());
        assert!(v.broken());
    }
}
