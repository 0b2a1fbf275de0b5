//! `Range: bytes=…` answered from a whole `200` (RFC 9110 §14): one
//! satisfiable range gives a `206` with `Content-Range`, streamed by
//! slicing the body as it passes (a stored body is sliced without a copy);
//! several give a `206` `multipart/byteranges`; none gives a `416` with
//! `Content-Range: bytes */length`. A `Range` that does not parse, names
//! another unit, or lists more than [`MAX_RANGES`] ranges is ignored (the
//! whole `200`), as RFC 9110 §14.2 allows; so is a response without a
//! `Content-Length`.

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;

use crate::body::{self, BoxError, ProxyBody};

/// Most ranges answered in one request; more and the `Range` is ignored.
pub const MAX_RANGES: usize = 16;

/// One range as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Spec {
    /// `first-` or `first-last`.
    From(u64, Option<u64>),
    /// `-suffix`: the last `suffix` bytes.
    Suffix(u64),
}

/// The ranges of a `Range` value; `None` if it is to be ignored.
fn parse(value: &str) -> Option<Vec<Spec>> {
    let (unit, list) = value.trim().split_once('=')?;
    if !unit.trim().eq_ignore_ascii_case("bytes") {
        return None;
    }
    let num = |s: &str| -> Option<u64> {
        let s = s.trim();
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    let mut specs = Vec::new();
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (first, last) = part.split_once('-')?;
        let spec = if first.trim().is_empty() {
            Spec::Suffix(num(last)?)
        } else {
            let first = num(first)?;
            let last = if last.trim().is_empty() {
                None
            } else {
                Some(num(last)?)
            };
            if last.is_some_and(|l| l < first) {
                return None;
            }
            Spec::From(first, last)
        };
        specs.push(spec);
        if specs.len() > MAX_RANGES {
            return None;
        }
    }
    (!specs.is_empty()).then_some(specs)
}

/// The satisfiable ranges of `specs` over `len` bytes, as `[start, end)`.
fn resolve(specs: &[Spec], len: u64) -> Vec<(u64, u64)> {
    specs
        .iter()
        .filter_map(|s| match *s {
            Spec::From(first, _) if first >= len => None,
            Spec::From(first, last) => Some((first, last.map_or(len, |l| (l + 1).min(len)))),
            Spec::Suffix(0) => None,
            Spec::Suffix(n) => Some((len.saturating_sub(n), len)),
        })
        .collect()
}

/// Answer `range` from `resp` (a `200`). `max_multipart`: the largest body
/// read into memory for a multipart answer (larger: the whole `200`).
pub async fn answer(
    resp: Response<ProxyBody>,
    range: &HeaderValue,
    max_multipart: u64,
) -> Response<ProxyBody> {
    let len = resp
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let (Some(len), Some(specs)) = (len, range.to_str().ok().and_then(parse)) else {
        return resp;
    };
    let ranges = resolve(&specs, len);
    let (mut head, body) = resp.into_parts();
    let storing = super::tee::is_storing(&head.extensions);
    match ranges.as_slice() {
        [] => {
            super::tee::finish_in_background(&head.extensions, body);
            head.status = StatusCode::RANGE_NOT_SATISFIABLE;
            set(
                &mut head.headers,
                header::CONTENT_RANGE,
                format!("bytes */{len}"),
            );
            head.headers.remove(header::CONTENT_TYPE);
            head.headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(0));
            Response::from_parts(head, body::empty())
        }
        [(start, end)] => {
            head.status = StatusCode::PARTIAL_CONTENT;
            let (start, end) = (*start, *end);
            set(
                &mut head.headers,
                header::CONTENT_RANGE,
                format!("bytes {start}-{}/{len}", end - 1),
            );
            head.headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(end - start));
            let slice = Slice {
                inner: Some(body),
                pos: 0,
                start,
                end,
                drain_rest: storing,
            };
            Response::from_parts(head, body::boxed(slice))
        }
        several => {
            if len > max_multipart {
                return Response::from_parts(head, body);
            }
            let Some(whole) = read_all(body, len).await else {
                return body::text_response(StatusCode::BAD_GATEWAY, "upstream body broke");
            };
            if whole.len() as u64 != len {
                return body::text_response(StatusCode::BAD_GATEWAY, "upstream body length");
            }
            let boundary = format!("sluicegate-{:016x}", fastrand::u64(..));
            let ctype = head.headers.remove(header::CONTENT_TYPE);
            let out = multipart(&whole, several, &boundary, ctype.as_ref());
            head.status = StatusCode::PARTIAL_CONTENT;
            set(
                &mut head.headers,
                header::CONTENT_TYPE,
                format!("multipart/byteranges; boundary={boundary}"),
            );
            head.headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(out.len()));
            Response::from_parts(head, body::full(out))
        }
    }
}

/// Read `body` whole, at most `len` bytes; `None` if it breaks.
async fn read_all(mut body: ProxyBody, len: u64) -> Option<Bytes> {
    let mut buf = BytesMut::with_capacity(len as usize);
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.ok()?.into_data() {
            if (buf.len() + data.len()) as u64 > len {
                return None;
            }
            buf.extend_from_slice(&data);
        }
    }
    Some(buf.freeze())
}

fn set(h: &mut http::HeaderMap, name: header::HeaderName, value: String) {
    if let Ok(v) = HeaderValue::from_str(&value) {
        h.insert(name, v);
    }
}

/// A `multipart/byteranges` body of `ranges` of `whole`.
fn multipart(
    whole: &Bytes,
    ranges: &[(u64, u64)],
    boundary: &str,
    ctype: Option<&HeaderValue>,
) -> Bytes {
    let len = whole.len();
    let mut out = BytesMut::new();
    for &(start, end) in ranges {
        out.extend_from_slice(b"\r\n--");
        out.extend_from_slice(boundary.as_bytes());
        out.extend_from_slice(b"\r\n");
        if let Some(ct) = ctype {
            out.extend_from_slice(b"Content-Type: ");
            out.extend_from_slice(ct.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        let cr = format!("Content-Range: bytes {start}-{}/{len}\r\n\r\n", end - 1);
        out.extend_from_slice(cr.as_bytes());
        out.extend_from_slice(&whole[start as usize..end as usize]);
    }
    out.extend_from_slice(b"\r\n--");
    out.extend_from_slice(boundary.as_bytes());
    out.extend_from_slice(b"--\r\n");
    out.freeze()
}

/// The bytes `[start, end)` of `inner`, passed on as they arrive. With
/// `drain_rest` (the whole body is being stored), the rest is read in the
/// background once the range is out, so the store gets the whole object.
struct Slice {
    inner: Option<ProxyBody>,
    pos: u64,
    start: u64,
    end: u64,
    drain_rest: bool,
}

impl Slice {
    /// The range is out: read the rest into the store, if it is being
    /// stored (in the background; the client's body ends now).
    fn drain(&mut self) {
        let Some(rest) = self.inner.take() else {
            return;
        };
        if self.drain_rest && self.pos >= self.end && !rest.is_end_stream() {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(super::tee::drain(rest));
            }
        }
    }
}

impl Drop for Slice {
    fn drop(&mut self) {
        // hyper stops polling once the announced length is out, so the end
        // of the range is usually seen here, not in `poll_frame`.
        self.drain();
    }
}

impl Body for Slice {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            if this.pos >= this.end {
                this.drain();
                return Poll::Ready(None);
            }
            let Some(inner) = this.inner.as_mut() else {
                return Poll::Ready(None);
            };
            match ready!(Pin::new(inner).poll_frame(cx)) {
                None => {
                    this.inner = None;
                    return Poll::Ready(None);
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                Some(Ok(frame)) => {
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    let (at, next) = (this.pos, this.pos + data.len() as u64);
                    this.pos = next;
                    let (from, to) = (this.start.max(at), this.end.min(next));
                    if from < to {
                        let piece = data.slice((from - at) as usize..(to - at) as usize);
                        return Poll::Ready(Some(Ok(Frame::data(piece))));
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.pos >= self.end || self.inner.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.end - self.start.max(self.pos).min(self.end))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_and_resolve() {
        let r = |s: &str, len| parse(s).map(|p| resolve(&p, len));
        assert_eq!(r("bytes=0-99", 1000), Some(vec![(0, 100)]));
        assert_eq!(r("Bytes= 500- ", 1000), Some(vec![(500, 1000)]));
        assert_eq!(r("bytes=-100", 1000), Some(vec![(900, 1000)]));
        assert_eq!(r("bytes=-5000", 1000), Some(vec![(0, 1000)]));
        assert_eq!(r("bytes=990-2000", 1000), Some(vec![(990, 1000)]));
        assert_eq!(r("bytes=0-0, -1", 10), Some(vec![(0, 1), (9, 10)]));
        assert_eq!(r("bytes=1000-", 1000), Some(vec![]));
        assert_eq!(r("bytes=-0", 1000), Some(vec![]));
        for ignored in [
            "items=0-1",
            "bytes=5-1",
            "bytes=a-b",
            "bytes=",
            "bytes=1",
            "0-1",
        ] {
            assert_eq!(parse(ignored), None, "{ignored}");
        }
        let many = format!("bytes={}", vec!["0-0"; MAX_RANGES + 1].join(","));
        assert_eq!(parse(&many), None);
    }

    async fn run(range: &'static str, chunks: &[&'static str]) -> (u16, http::HeaderMap, Bytes) {
        let total: usize = chunks.iter().map(|c| c.len()).sum();
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = chunks
            .iter()
            .map(|c| Ok(Frame::data(Bytes::from_static(c.as_bytes()))))
            .collect();
        let body = body::boxed(http_body_util::StreamBody::new(futures_util::stream::iter(
            frames,
        )));
        let resp = Response::builder()
            .header("content-length", total)
            .header("content-type", "text/plain")
            .body(body)
            .unwrap();
        let out = answer(resp, &HeaderValue::from_static(range), 1 << 20).await;
        let status = out.status().as_u16();
        let (head, body) = out.into_parts();
        (
            status,
            head.headers,
            body.collect().await.unwrap().to_bytes(),
        )
    }

    #[tokio::test]
    async fn a_single_range_is_sliced_across_frames() {
        let (s, h, b) = run("bytes=3-7", &["abcd", "efgh", "ij"]).await;
        assert_eq!((s, &b[..]), (206, &b"defgh"[..]));
        assert_eq!(h["content-range"], "bytes 3-7/10");
        assert_eq!(h["content-length"], "5");
        let (s, _, b) = run("bytes=-2", &["abcd", "efgh", "ij"]).await;
        assert_eq!((s, &b[..]), (206, &b"ij"[..]));
    }

    #[tokio::test]
    async fn several_ranges_are_multipart_and_none_is_416() {
        let (s, h, b) = run("bytes=0-1,8-", &["abcd", "efgh", "ij"]).await;
        assert_eq!(s, 206);
        let ct = h["content-type"].to_str().unwrap();
        let boundary = ct.strip_prefix("multipart/byteranges; boundary=").unwrap();
        let want = format!(
            "\r\n--{boundary}\r\nContent-Type: text/plain\r\nContent-Range: bytes 0-1/10\r\n\r\nab\
             \r\n--{boundary}\r\nContent-Type: text/plain\r\nContent-Range: bytes 8-9/10\r\n\r\nij\
             \r\n--{boundary}--\r\n"
        );
        assert_eq!(std::str::from_utf8(&b).unwrap(), want);
        assert_eq!(h["content-length"], b.len().to_string().as_str());
        let (s, h, b) = run("bytes=10-", &["abcd", "efgh", "ij"]).await;
        assert_eq!((s, b.len()), (416, 0));
        assert_eq!(h["content-range"], "bytes */10");
        let (s, _, b) = run("lines=1-2", &["abcd"]).await;
        assert_eq!((s, &b[..]), (200, &b"abcd"[..]));
    }
}
