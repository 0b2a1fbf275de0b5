//! Streaming body phases (contract 0.2): a body that passes each chunk
//! through the filters that asked for `request-chunks` or
//! `response-chunks` as it streams, with nothing buffered beyond the chunk.
//!
//! Each chunk goes through the filters in order (the response's in
//! reverse); a filter keeps it, replaces it, or answers locally:
//! - on the request body, a local answer stops the upload (the upstream
//!   sees the body end in an error) and the proxy answers the client with
//!   it instead of the upstream's response ([`LocalSlot`]);
//! - on the response body, the first chunk is run before the head goes to
//!   the client ([`ChunkBody::prime`]), so a local answer there replaces
//!   the whole response; after that no answer is possible, and one counts
//!   as the filter's failure.
//!
//! A filter's failure goes through its policy: fail-open passes the chunk
//! on unchanged, fail-closed ends the body in an error (the request side
//! then answers 500).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, Response};
use http_body::{Body, Frame};
use parking_lot::Mutex;

use super::action::BodyAction;
use super::chain::local_response;
use super::exchange::SharedExchange;
use super::instance::{FilterFailure, FilterVersion};
use crate::body::{self, ProxyBody};
use crate::config::OnError;

/// Where a request-chunk filter's local answer waits for the proxy.
pub type LocalSlot = Arc<Mutex<Option<Response<ProxyBody>>>>;

/// The filters of one stream, in call order, with their policies.
pub type ChunkFilters = Arc<[(Arc<FilterVersion>, OnError)]>;

/// Why a chunk stopped the stream.
enum Stop {
    /// Answer with this (or, past the response's first chunk, fail).
    Respond(Response<ProxyBody>),
    /// A fail-closed filter failed.
    Failed(String),
}

type Pending = Pin<Box<dyn Future<Output = Result<Bytes, Stop>> + Send>>;

/// Run one chunk through every filter.
async fn run_chunk(
    filters: ChunkFilters,
    ex: SharedExchange,
    response: bool,
    may_respond: bool,
    mut chunk: Bytes,
    end: bool,
) -> Result<Bytes, Stop> {
    for (version, on_error) in filters.iter() {
        let outcome = if version.stats.quarantined() {
            Err(FilterFailure::Quarantined)
        } else {
            match version.on_chunk(response, chunk.clone(), end, &ex).await {
                Ok(BodyAction::Continue) => Ok(None),
                Ok(BodyAction::Replace(b)) => Ok(Some(Bytes::from(b))),
                Ok(BodyAction::Respond(_)) if !version.policy.grants.may_respond => {
                    super::host_api::denied(&version.name, "respond");
                    Err(FilterFailure::Invalid(
                        "answered locally, which its policy does not grant".into(),
                    ))
                }
                Ok(BodyAction::Respond(_)) if !may_respond => Err(FilterFailure::Invalid(
                    "answered locally after the response had started".into(),
                )),
                Ok(BodyAction::Respond(local)) => match local_response(local) {
                    Ok(resp) => {
                        version.stats.record_success();
                        return Err(Stop::Respond(resp));
                    }
                    Err(e) => Err(FilterFailure::Invalid(e)),
                },
                Err(f) => Err(f),
            }
        };
        match outcome {
            Ok(replaced) => {
                version.stats.record_success();
                if let Some(b) = replaced {
                    chunk = b;
                }
            }
            Err(f) => {
                if matches!(f, FilterFailure::Invalid(_)) {
                    version.stats.record_failure(&f);
                }
                tracing::warn!(filter = %version.name, error = %f, "chunk phase failed");
                if *on_error == OnError::FailClosed {
                    return Err(Stop::Failed(format!("filter {} failed", version.name)));
                }
            }
        }
    }
    Ok(chunk)
}

#[derive(Debug, PartialEq, Eq)]
enum State {
    /// Reading the inner body.
    Streaming,
    /// The last call (with `end`) is running or done; then trailers.
    Ending,
    /// Everything is out.
    Done,
}

/// A body whose chunks pass through chunk filters as they stream.
pub struct ChunkBody {
    inner: ProxyBody,
    filters: ChunkFilters,
    ex: SharedExchange,
    response: bool,
    pending: Option<Pending>,
    state: State,
    trailers: Option<HeaderMap>,
    /// A chunk already through the filters (from `prime`).
    first: Option<Bytes>,
    /// Request side: where a local answer goes.
    slot: Option<LocalSlot>,
}

impl ChunkBody {
    /// The request body through `filters`; local answers go to `slot`.
    pub fn request(
        inner: ProxyBody,
        filters: ChunkFilters,
        ex: SharedExchange,
        slot: LocalSlot,
    ) -> ChunkBody {
        ChunkBody::new(inner, filters, ex, false, Some(slot))
    }

    /// The response body through `filters`.
    pub fn response(inner: ProxyBody, filters: ChunkFilters, ex: SharedExchange) -> ChunkBody {
        ChunkBody::new(inner, filters, ex, true, None)
    }

    fn new(
        inner: ProxyBody,
        filters: ChunkFilters,
        ex: SharedExchange,
        response: bool,
        slot: Option<LocalSlot>,
    ) -> ChunkBody {
        ChunkBody {
            inner,
            filters,
            ex,
            response,
            pending: None,
            state: State::Streaming,
            trailers: None,
            first: None,
            slot,
        }
    }

    /// Run the response's first chunk through the filters before its head
    /// is sent: `Err` is the response to send instead (a filter's local
    /// answer, or 500 from a fail-closed failure).
    pub async fn prime(mut self) -> Result<ChunkBody, Response<ProxyBody>> {
        let first = std::future::poll_fn(|cx| self.poll_next(cx, true)).await;
        match first {
            Some(Ok(bytes)) => {
                self.first = Some(bytes);
                Ok(self)
            }
            Some(Err(Stop::Respond(resp))) => Err(resp),
            Some(Err(Stop::Failed(text))) => Err(body::text_response(
                http::StatusCode::INTERNAL_SERVER_ERROR,
                &text,
            )),
            None => Ok(self),
        }
    }

    fn start(&mut self, chunk: Bytes, end: bool, may_respond: bool) {
        let fut = run_chunk(
            self.filters.clone(),
            self.ex.clone(),
            self.response,
            may_respond,
            chunk,
            end,
        );
        self.pending = Some(Box::pin(fut));
    }

    /// The next chunk out of the filters (`None`: no more data).
    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
        may_respond: bool,
    ) -> Poll<Option<Result<Bytes, Stop>>> {
        loop {
            if let Some(fut) = self.pending.as_mut() {
                let out = std::task::ready!(fut.as_mut().poll(cx));
                self.pending = None;
                match out {
                    Ok(b) if b.is_empty() && self.state == State::Streaming => continue,
                    Ok(b) if b.is_empty() => return Poll::Ready(None),
                    Ok(b) => return Poll::Ready(Some(Ok(b))),
                    Err(stop) => {
                        self.state = State::Done;
                        return Poll::Ready(Some(Err(stop)));
                    }
                }
            }
            if self.state != State::Streaming {
                return Poll::Ready(None);
            }
            match std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx)) {
                None => {
                    self.state = State::Ending;
                    self.start(Bytes::new(), true, may_respond);
                }
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        let end = self.inner.is_end_stream();
                        if end {
                            self.state = State::Ending;
                        }
                        self.start(data, end, may_respond);
                    }
                    Err(frame) => {
                        if let Ok(t) = frame.into_trailers() {
                            self.trailers = Some(t);
                        }
                        self.state = State::Ending;
                        self.start(Bytes::new(), true, may_respond);
                    }
                },
                Some(Err(e)) => {
                    self.state = State::Done;
                    tracing::debug!(error = %e, "body failed under a chunk filter");
                    return Poll::Ready(Some(Err(Stop::Failed("the body failed".into()))));
                }
            }
        }
    }
}

impl Body for ChunkBody {
    type Data = Bytes;
    type Error = body::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if let Some(b) = this.first.take() {
            return Poll::Ready(Some(Ok(Frame::data(b))));
        }
        // The request side may answer at any chunk (the client has had no
        // byte yet); the response side only in `prime`.
        let may_respond = !this.response;
        match std::task::ready!(this.poll_next(cx, may_respond)) {
            Some(Ok(b)) => Poll::Ready(Some(Ok(Frame::data(b)))),
            Some(Err(stop)) => {
                let resp = match stop {
                    Stop::Respond(resp) => resp,
                    Stop::Failed(text) => {
                        body::text_response(http::StatusCode::INTERNAL_SERVER_ERROR, &text)
                    }
                };
                if let Some(slot) = &this.slot {
                    *slot.lock() = Some(resp);
                }
                Poll::Ready(Some(Err("stopped by a chunk filter".into())))
            }
            None => {
                this.state = State::Done;
                Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.state == State::Done && self.first.is_none() && self.trailers.is_none()
    }
}

/// A body that counts its data bytes into a shared counter (the request
/// body's `bytes-in` for the log phase).
pub struct Counted {
    inner: ProxyBody,
    bytes: Arc<std::sync::atomic::AtomicU64>,
}

impl Counted {
    /// Count `inner`'s bytes into `bytes`.
    pub fn new(inner: ProxyBody, bytes: Arc<std::sync::atomic::AtomicU64>) -> Counted {
        Counted { inner, bytes }
    }
}

impl Body for Counted {
    type Data = Bytes;
    type Error = body::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let frame = std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx));
        if let Some(Ok(f)) = &frame {
            if let Some(d) = f.data_ref() {
                this.bytes
                    .fetch_add(d.len() as u64, std::sync::atomic::Ordering::Relaxed);
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The response body of a request with `on-log` filters: it counts the
/// bytes sent and, once the body has ended (or the client went away, and
/// the body is dropped), runs the log phases in a task of their own, so
/// the response never waits for them.
pub struct LogBody {
    inner: ProxyBody,
    bytes: u64,
    log: Option<LogJob>,
}

struct LogJob {
    filters: Vec<Arc<FilterVersion>>,
    ex: SharedExchange,
    status: u16,
    bytes_in: Option<Arc<std::sync::atomic::AtomicU64>>,
}

impl LogBody {
    /// Wrap `inner`; `filters` run with the exchange once it ends.
    pub fn new(
        inner: ProxyBody,
        filters: Vec<Arc<FilterVersion>>,
        ex: SharedExchange,
        status: u16,
        bytes_in: Option<Arc<std::sync::atomic::AtomicU64>>,
    ) -> LogBody {
        LogBody {
            inner,
            bytes: 0,
            log: Some(LogJob {
                filters,
                ex,
                status,
                bytes_in,
            }),
        }
    }

    fn fire(&mut self) {
        let Some(job) = self.log.take() else { return };
        // Outside a runtime (never on the data path) there is nowhere to
        // run the phase: it is skipped rather than panicking.
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let bytes_out = self.bytes;
        rt.spawn(async move {
            let duration = job.ex.lock().started.elapsed();
            let entry = super::bindings_v2::sluicegate::filter::types::LogEntry {
                status: job.status,
                bytes_in: job
                    .bytes_in
                    .map(|b| b.load(std::sync::atomic::Ordering::Relaxed))
                    .unwrap_or(0),
                bytes_out,
                duration_us: duration.as_micros() as u64,
            };
            for version in &job.filters {
                if version.stats.quarantined() {
                    continue;
                }
                match version.on_log(entry, &job.ex).await {
                    Ok(()) => version.stats.record_success(),
                    Err(e) => {
                        tracing::debug!(filter = %version.name, error = %e, "log phase failed")
                    }
                }
            }
        });
    }
}

impl Body for LogBody {
    type Data = Bytes;
    type Error = body::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let frame = std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &frame {
            Some(Ok(f)) => {
                if let Some(d) = f.data_ref() {
                    this.bytes += d.len() as u64;
                }
                if this.inner.is_end_stream() {
                    this.fire();
                }
            }
            _ => this.fire(),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for LogBody {
    fn drop(&mut self) {
        self.fire();
    }
}
