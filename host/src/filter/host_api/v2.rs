//! The host side of contract 0.2's imports: the `fields`, `request`,
//! `response` and `exchange` resources, labelled metrics, and log, kv and
//! env (which answer as 0.1's do).
//!
//! Heads are lent exactly as for 0.1 (fixed reps, see [`Lent`]); a head's
//! `fields` handle is an own handle with a fixed rep too (11: the request's
//! headers, 12: the response's), so `headers()` allocates nothing and the
//! guest's drop is a no-op. The one implementation of header access,
//! with the manifest's checks and the undo log, is [`HostState::field_get`]
//! and its siblings, shared by both heads.

use std::sync::Arc;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use wasmtime::component::Resource;

use super::{denied, HostState, Lent, RequestHead, ResponseHead, Side, Undo, Wr};
use super::{MAX_HEADER_FIELDS, MAX_HEADER_VALUE};
use crate::config::header_listed;
use crate::filter::bindings_v2::sluicegate::filter::{env, kv, log, metrics as wit_metrics, types};
use crate::filter::exchange::{Deferred, Exchange};
use types::FieldError;

/// The `fields` resource: which head's headers a handle names.
pub struct Fields;

/// The `exchange` resource's handle (the data is the store's
/// [`HostState::exchange`]).
pub struct ExchangeHandle;

const REQUEST_FIELDS: u32 = 11;
const RESPONSE_FIELDS: u32 = 12;
/// The rep of the exchange handle lent to each 0.2 call.
pub const EXCHANGE_REP: u32 = 21;

fn side_of(r: &Resource<Fields>) -> Wr<Side> {
    match r.rep() {
        REQUEST_FIELDS => Ok(Side::Request),
        RESPONSE_FIELDS => Ok(Side::Response),
        _ => Err(wasmtime::format_err!("unknown fields handle")),
    }
}

/// Check a field a filter wants to write: its name, its value's bytes
/// (any visible ASCII or obs-text byte; no CR, LF or NUL) and the limits.
pub fn checked_field(
    headers: &HeaderMap,
    name: &str,
    value: &[u8],
    adding: bool,
) -> Result<(HeaderName, HeaderValue), FieldError> {
    let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| FieldError::InvalidName)?;
    if value.len() > MAX_HEADER_VALUE {
        return Err(FieldError::TooLarge);
    }
    let value = HeaderValue::from_bytes(value).map_err(|_| FieldError::InvalidValue)?;
    let grows = adding || !headers.contains_key(&name);
    if grows && headers.len() >= MAX_HEADER_FIELDS {
        return Err(FieldError::TooLarge);
    }
    Ok((name, value))
}

impl HostState {
    fn fields_ref(&self, side: Side) -> Wr<&HeaderMap> {
        match side {
            Side::Request => Ok(&self
                .req(&Resource::new_borrow(RequestHead::REP))?
                .parts
                .headers),
            Side::Response => Ok(&self
                .resp(&Resource::new_borrow(ResponseHead::REP))?
                .parts
                .headers),
        }
    }

    fn hidden(&self, name: &str) -> bool {
        header_listed(&self.grants.hide_headers, name)
    }

    fn field_write(
        &mut self,
        side: Side,
        name: &str,
        value: &[u8],
        adding: bool,
    ) -> Wr<Result<(), FieldError>> {
        if self.protected(name) {
            return Ok(Err(FieldError::Forbidden));
        }
        let (n, v) = match checked_field(self.fields_ref(side)?, name, value, adding) {
            Ok(pair) => pair,
            Err(e) => return Ok(Err(e)),
        };
        let mut edits = std::mem::take(&mut self.edits);
        let rep = match side {
            Side::Request => RequestHead::REP,
            Side::Response => ResponseHead::REP,
        };
        let headers = self.headers_mut(side, rep)?;
        edits.header(side, headers, &n);
        if adding {
            headers.append(n, v);
        } else {
            headers.insert(n, v);
        }
        self.edits = edits;
        Ok(Ok(()))
    }

    fn field_remove(&mut self, side: Side, name: &str) -> Wr<Result<(), FieldError>> {
        if HeaderName::from_bytes(name.as_bytes()).is_err() {
            return Ok(Err(FieldError::InvalidName));
        }
        if self.protected(name) {
            return Ok(Err(FieldError::Forbidden));
        }
        let rep = match side {
            Side::Request => RequestHead::REP,
            Side::Response => ResponseHead::REP,
        };
        self.erase(side, rep, name)?;
        Ok(Ok(()))
    }

    fn exchange(&self) -> Wr<&crate::filter::exchange::SharedExchange> {
        self.exchange
            .as_ref()
            .ok_or_else(|| wasmtime::format_err!("no exchange is lent to this call"))
    }
}

impl types::Host for HostState {}

impl types::HostFields for HostState {
    fn get(&mut self, r: Resource<Fields>, name: String) -> Wr<Option<Vec<u8>>> {
        let side = side_of(&r)?;
        if self.hidden(&name) {
            return Ok(None);
        }
        Ok(self
            .fields_ref(side)?
            .get(name.as_str())
            .map(|v| v.as_bytes().to_vec()))
    }
    fn get_all(&mut self, r: Resource<Fields>, name: String) -> Wr<Vec<Vec<u8>>> {
        let side = side_of(&r)?;
        if self.hidden(&name) {
            return Ok(Vec::new());
        }
        Ok(self
            .fields_ref(side)?
            .get_all(name.as_str())
            .iter()
            .map(|v| v.as_bytes().to_vec())
            .collect())
    }
    fn has(&mut self, r: Resource<Fields>, name: String) -> Wr<bool> {
        let side = side_of(&r)?;
        Ok(!self.hidden(&name) && self.fields_ref(side)?.contains_key(name.as_str()))
    }
    fn names(&mut self, r: Resource<Fields>) -> Wr<Vec<String>> {
        let side = side_of(&r)?;
        Ok(self.read_names(self.fields_ref(side)?))
    }
    fn set(
        &mut self,
        r: Resource<Fields>,
        name: String,
        value: Vec<u8>,
    ) -> Wr<Result<(), FieldError>> {
        let side = side_of(&r)?;
        self.field_write(side, &name, &value, false)
    }
    fn append(
        &mut self,
        r: Resource<Fields>,
        name: String,
        value: Vec<u8>,
    ) -> Wr<Result<(), FieldError>> {
        let side = side_of(&r)?;
        self.field_write(side, &name, &value, true)
    }
    fn remove(&mut self, r: Resource<Fields>, name: String) -> Wr<Result<(), FieldError>> {
        let side = side_of(&r)?;
        self.field_remove(side, &name)
    }
    fn drop(&mut self, _r: Resource<Fields>) -> Wr<()> {
        // A fixed-rep handle: nothing to free.
        Ok(())
    }
}

impl types::HostRequest for HostState {
    fn method(&mut self, r: Resource<RequestHead>) -> Wr<String> {
        Ok(self.req(&r)?.parts.method.as_str().to_string())
    }
    fn set_method(
        &mut self,
        r: Resource<RequestHead>,
        method: String,
    ) -> Wr<Result<(), FieldError>> {
        let Ok(m) = http::Method::from_bytes(method.as_bytes()) else {
            return Ok(Err(FieldError::InvalidName));
        };
        let old = std::mem::replace(&mut self.req_mut(&r)?.parts.method, m);
        self.edits.0.push(Undo::Method(old));
        Ok(Ok(()))
    }
    fn path(&mut self, r: Resource<RequestHead>) -> Wr<String> {
        let uri = &self.req(&r)?.parts.uri;
        Ok(uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
            .to_string())
    }
    fn set_path(&mut self, r: Resource<RequestHead>, path: String) -> Wr<Result<(), FieldError>> {
        Ok(self
            .replace_path(&r, &path)?
            .map_err(|_| FieldError::InvalidValue))
    }
    fn authority(&mut self, r: Resource<RequestHead>) -> Wr<Option<String>> {
        let head = self.req(&r)?;
        Ok(head
            .parts
            .uri
            .authority()
            .map(|a| a.as_str().to_string())
            .or_else(|| self.read_one(&head.parts.headers, "host")))
    }
    fn set_authority(
        &mut self,
        r: Resource<RequestHead>,
        authority: String,
    ) -> Wr<Result<(), FieldError>> {
        if self.protected("host") {
            return Ok(Err(FieldError::Forbidden));
        }
        let Ok(auth) = http::uri::Authority::try_from(authority.as_str()) else {
            return Ok(Err(FieldError::InvalidName));
        };
        if auth.as_str().contains('@') {
            return Ok(Err(FieldError::InvalidName));
        }
        let Ok(value) = HeaderValue::from_str(auth.as_str()) else {
            return Ok(Err(FieldError::InvalidValue));
        };
        let mut edits = std::mem::take(&mut self.edits);
        let head = self.req_mut(&r)?;
        if head.parts.uri.authority().is_some() {
            let mut parts = head.parts.uri.clone().into_parts();
            parts.authority = Some(auth);
            if let Ok(uri) = http::Uri::from_parts(parts) {
                let old = std::mem::replace(&mut head.parts.uri, uri);
                edits.0.push(Undo::Uri(old));
            }
        }
        edits.header(Side::Request, &head.parts.headers, &http::header::HOST);
        head.parts.headers.insert(http::header::HOST, value);
        self.edits = edits;
        Ok(Ok(()))
    }
    fn scheme(&mut self, r: Resource<RequestHead>) -> Wr<String> {
        Ok(self.req(&r)?.scheme.to_string())
    }
    fn headers(&mut self, r: Resource<RequestHead>) -> Wr<Resource<Fields>> {
        self.req(&r)?;
        Ok(Resource::new_own(REQUEST_FIELDS))
    }
    fn drop(&mut self, _r: Resource<RequestHead>) -> Wr<()> {
        Ok(())
    }
}

impl types::HostResponse for HostState {
    fn status(&mut self, r: Resource<ResponseHead>) -> Wr<u16> {
        Ok(self.resp(&r)?.parts.status.as_u16())
    }
    fn set_status(&mut self, r: Resource<ResponseHead>, status: u16) -> Wr<Result<(), FieldError>> {
        match http::StatusCode::from_u16(status) {
            Ok(s) => {
                let old = std::mem::replace(&mut self.resp_mut(&r)?.parts.status, s);
                self.edits.0.push(Undo::Status(old));
                Ok(Ok(()))
            }
            Err(_) => Ok(Err(FieldError::InvalidValue)),
        }
    }
    fn headers(&mut self, r: Resource<ResponseHead>) -> Wr<Resource<Fields>> {
        self.resp(&r)?;
        Ok(Resource::new_own(RESPONSE_FIELDS))
    }
    fn drop(&mut self, _r: Resource<ResponseHead>) -> Wr<()> {
        Ok(())
    }
}

fn version_text(v: http::Version) -> &'static str {
    match v {
        http::Version::HTTP_09 => "HTTP/0.9",
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_2 => "HTTP/2.0",
        http::Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/1.1",
    }
}

/// The request's properties as the WIT record.
pub fn request_info(ex: &Exchange) -> types::RequestInfo {
    types::RequestInfo {
        route: ex.route.to_string(),
        upstream: ex.upstream.to_string(),
        protocol: version_text(ex.version).to_string(),
        client_ip: ex.client.ip().to_string(),
        client_port: ex.client.port(),
        tls_sni: ex.tls.as_ref().and_then(|t| t.sni.clone()),
        tls_alpn: ex.tls.as_ref().and_then(|t| t.alpn.clone()),
        start_ms: ex.start_ms(),
    }
}

/// The request id and the request's properties, as `filter test` prints
/// them.
pub fn request_info_of(ex: &Exchange) -> (String, String) {
    (
        String::from_utf8_lossy(ex.id.as_bytes()).into_owned(),
        format!("{:?}", request_info(ex)),
    )
}

/// The answer's properties as the WIT record.
pub fn upstream_info(ex: &Exchange) -> Option<types::UpstreamInfo> {
    let a = ex.answer.as_ref()?;
    Some(types::UpstreamInfo {
        endpoint: a.endpoint.as_ref().map(|e| e.to_string()),
        latency_us: a.latency.as_micros() as u64,
        attempts: a.attempts,
        cache: match a.cache_hit {
            None => types::CacheStatus::None,
            Some(true) => types::CacheStatus::Hit,
            Some(false) => types::CacheStatus::Miss,
        },
    })
}

impl types::HostExchange for HostState {
    fn request_id(&mut self, _r: Resource<ExchangeHandle>) -> Wr<String> {
        let ex = self.exchange()?.lock();
        Ok(String::from_utf8_lossy(ex.id.as_bytes()).into_owned())
    }
    fn get_local(&mut self, _r: Resource<ExchangeHandle>, key: String) -> Wr<Option<Vec<u8>>> {
        let ex = self.exchange()?.lock();
        Ok(ex.get_local(&self.ctx.name, &key).map(<[u8]>::to_vec))
    }
    fn set_local(
        &mut self,
        _r: Resource<ExchangeHandle>,
        key: String,
        value: Vec<u8>,
    ) -> Wr<Result<(), types::LocalError>> {
        let name = self.ctx.name.clone();
        let shared = self.exchange()?.clone();
        let mut ex = shared.lock();
        let old = ex.get_local(&name, &key).map(<[u8]>::to_vec);
        if !ex.set_local(&name, key.clone(), value) {
            return Ok(Err(types::LocalError::TooLarge));
        }
        drop(ex);
        self.edits.0.push(Undo::Local(shared, name, key, old));
        Ok(Ok(()))
    }
    fn request_info(&mut self, _r: Resource<ExchangeHandle>) -> Wr<types::RequestInfo> {
        Ok(request_info(&self.exchange()?.lock()))
    }
    fn upstream_info(&mut self, _r: Resource<ExchangeHandle>) -> Wr<Option<types::UpstreamInfo>> {
        Ok(upstream_info(&self.exchange()?.lock()))
    }
    fn defer_response_header(
        &mut self,
        _r: Resource<ExchangeHandle>,
        edit: types::HeaderEdit,
    ) -> Wr<Result<(), FieldError>> {
        let name = match &edit {
            types::HeaderEdit::Set((n, _)) | types::HeaderEdit::Append((n, _)) => n,
            types::HeaderEdit::Remove(n) => n,
        };
        if self.protected(name) {
            return Ok(Err(FieldError::Forbidden));
        }
        let empty = HeaderMap::new();
        let deferred = match &edit {
            types::HeaderEdit::Set((n, v)) | types::HeaderEdit::Append((n, v)) => {
                let (n, v) = match checked_field(&empty, n, v, false) {
                    Ok(pair) => pair,
                    Err(e) => return Ok(Err(e)),
                };
                if matches!(edit, types::HeaderEdit::Set(_)) {
                    Deferred::Set(n, v)
                } else {
                    Deferred::Append(n, v)
                }
            }
            types::HeaderEdit::Remove(n) => match HeaderName::from_bytes(n.as_bytes()) {
                Ok(n) => Deferred::Remove(n),
                Err(_) => return Ok(Err(FieldError::InvalidName)),
            },
        };
        let shared = self.exchange()?.clone();
        let mut ex = shared.lock();
        if ex.deferred.len() >= MAX_HEADER_FIELDS {
            return Ok(Err(FieldError::TooLarge));
        }
        ex.deferred.push(deferred);
        let len = ex.deferred.len() - 1;
        drop(ex);
        self.edits.0.push(Undo::Deferred(shared, len));
        Ok(Ok(()))
    }
    fn drop(&mut self, _r: Resource<ExchangeHandle>) -> Wr<()> {
        Ok(())
    }
}

impl log::Host for HostState {
    fn write(&mut self, level: types::LogLevel, message: String) -> Wr<()> {
        use crate::filter::bindings::sluicegate::filter::types::LogLevel as L1;
        let level = match level {
            types::LogLevel::Trace => L1::Trace,
            types::LogLevel::Debug => L1::Debug,
            types::LogLevel::Info => L1::Info,
            types::LogLevel::Warn => L1::Warn,
            types::LogLevel::Error => L1::Error,
        };
        crate::filter::bindings::sluicegate::filter::log::Host::write(self, level, message)
    }
}

impl kv::Host for HostState {
    fn get(&mut self, key: String) -> Wr<Option<Vec<u8>>> {
        crate::filter::bindings::sluicegate::filter::kv::Host::get(self, key)
    }
    fn set(&mut self, key: String, value: Vec<u8>, ttl_ms: Option<u64>) -> Wr<()> {
        crate::filter::bindings::sluicegate::filter::kv::Host::set(self, key, value, ttl_ms)
    }
    fn delete(&mut self, key: String) -> Wr<bool> {
        crate::filter::bindings::sluicegate::filter::kv::Host::delete(self, key)
    }
    fn increment(
        &mut self,
        key: String,
        delta: i64,
        ttl_ms: Option<u64>,
    ) -> Wr<Result<i64, String>> {
        crate::filter::bindings::sluicegate::filter::kv::Host::increment(self, key, delta, ttl_ms)
    }
    fn compare_and_swap(
        &mut self,
        key: String,
        expected: Option<Vec<u8>>,
        value: Vec<u8>,
        ttl_ms: Option<u64>,
    ) -> Wr<bool> {
        crate::filter::bindings::sluicegate::filter::kv::Host::compare_and_swap(
            self, key, expected, value, ttl_ms,
        )
    }
}

impl env::Host for HostState {
    fn now_ms(&mut self) -> Wr<u64> {
        crate::filter::bindings::sluicegate::filter::env::Host::now_ms(self)
    }
    fn monotonic_ns(&mut self) -> Wr<u64> {
        crate::filter::bindings::sluicegate::filter::env::Host::monotonic_ns(self)
    }
    fn random_u64(&mut self) -> Wr<u64> {
        crate::filter::bindings::sluicegate::filter::env::Host::random_u64(self)
    }
}

/// Most labels on one sample.
const MAX_LABELS: usize = 8;
/// Longest metric name, label key or label value.
const MAX_METRIC_TEXT: usize = 128;

fn valid_label_key(k: &str) -> bool {
    let mut bytes = k.bytes();
    matches!(bytes.next(), Some(b'a'..=b'z' | b'_'))
        && bytes.all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_'))
        && !matches!(k, "filter" | "name" | "le" | "quantile")
        && k.len() <= MAX_METRIC_TEXT
}

/// The kind of a filter's metric series.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SeriesKind {
    /// `sluicegate_filter_counter_total`.
    Counter,
    /// `sluicegate_filter_gauge`.
    Gauge,
    /// `sluicegate_filter_histogram`.
    Histogram,
}

/// A registered series' handle.
#[derive(Debug, Clone)]
pub enum Series {
    /// A counter.
    Counter(metrics::Counter),
    /// A gauge.
    Gauge(metrics::Gauge),
    /// A histogram.
    Histogram(metrics::Histogram),
}

/// A series' identity: kind, name, labels (sorted).
pub type SeriesKey = (SeriesKind, String, Vec<(String, String)>);

impl HostState {
    /// The series for a sample, made on first use within the filter's cap.
    /// `None`: refused (bad name or labels) or past the cap; counted.
    fn series(
        &mut self,
        kind: SeriesKind,
        name: String,
        mut labels: Vec<(String, String)>,
    ) -> Option<Series> {
        let filter = &self.ctx.name;
        if name.is_empty()
            || name.len() > MAX_METRIC_TEXT
            || labels.len() > MAX_LABELS
            || labels
                .iter()
                .any(|(k, v)| !valid_label_key(k) || v.len() > MAX_METRIC_TEXT)
        {
            dropped(filter, "invalid");
            return None;
        }
        labels.sort();
        labels.dedup_by(|a, b| a.0 == b.0);
        let key: SeriesKey = (kind, name, labels);
        let mut series = self.ctx.series.lock();
        if let Some(s) = series.get(&key) {
            return Some(s.clone());
        }
        let used = series.len() + self.ctx.counters.lock().len();
        if used as u64 >= self.grants.max_metrics {
            drop(series);
            dropped(filter, "cardinality");
            denied(filter, "metric");
            return None;
        }
        let mut all = Vec::with_capacity(key.2.len() + 2);
        all.push(metrics::Label::new("filter", filter.to_string()));
        all.push(metrics::Label::new("name", key.1.clone()));
        for (k, v) in &key.2 {
            all.push(metrics::Label::new(k.clone(), v.clone()));
        }
        let s = match kind {
            SeriesKind::Counter => {
                Series::Counter(metrics::counter!("sluicegate_filter_counter_total", all))
            }
            SeriesKind::Gauge => Series::Gauge(metrics::gauge!("sluicegate_filter_gauge", all)),
            SeriesKind::Histogram => {
                Series::Histogram(metrics::histogram!("sluicegate_filter_histogram", all))
            }
        };
        series.insert(key, s.clone());
        Some(s)
    }
}

/// Count a sample dropped, by filter and reason.
fn dropped(filter: &Arc<str>, reason: &'static str) {
    metrics::counter!("sluicegate_filter_metrics_dropped_total", "filter" => filter.to_string(), "reason" => reason).increment(1);
}

impl wit_metrics::Host for HostState {
    fn counter_add(&mut self, name: String, labels: Vec<(String, String)>, delta: u64) -> Wr<()> {
        if let Some(Series::Counter(c)) = self.series(SeriesKind::Counter, name, labels) {
            c.increment(delta);
        }
        Ok(())
    }
    fn gauge_set(&mut self, name: String, labels: Vec<(String, String)>, value: f64) -> Wr<()> {
        if let Some(Series::Gauge(g)) = self.series(SeriesKind::Gauge, name, labels) {
            g.set(value);
        }
        Ok(())
    }
    fn gauge_add(&mut self, name: String, labels: Vec<(String, String)>, delta: f64) -> Wr<()> {
        if let Some(Series::Gauge(g)) = self.series(SeriesKind::Gauge, name, labels) {
            g.increment(delta);
        }
        Ok(())
    }
    fn histogram_record(
        &mut self,
        name: String,
        labels: Vec<(String, String)>,
        value: f64,
    ) -> Wr<()> {
        if !value.is_finite() {
            dropped(&self.ctx.name, "invalid");
            return Ok(());
        }
        if let Some(Series::Histogram(h)) = self.series(SeriesKind::Histogram, name, labels) {
            h.record(value);
        }
        Ok(())
    }
}
