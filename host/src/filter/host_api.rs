//! What a filter can reach: the host side of the WIT imports (the heads as
//! resources, log, kv, metrics, env) and the per-store state behind them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use http::header::{HeaderMap, HeaderName, HeaderValue};
use parking_lot::Mutex;
use wasmtime::component::{Resource, ResourceTable};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::bindings::sluicegate::filter::{env, kv, log, metrics as wit_metrics, types};
use super::exchange::SharedExchange;
use super::kv::KvStore;
use super::stdio::{LogStdio, Stdio};
use crate::config::{header_listed, Grants};

mod v2;
pub use v2::{checked_field, request_info_of, ExchangeHandle, Fields, EXCHANGE_REP};

/// Longest header value a filter may set, bytes.
pub const MAX_HEADER_VALUE: usize = 16 * 1024;
/// Most header fields a head may carry after a filter adds to it (common
/// upstream servers refuse more than 100; the proxy adds a few itself).
pub const MAX_HEADER_FIELDS: usize = 90;
/// Longest log line kept from a filter.
pub const MAX_LOG_LINE: usize = 4096;

/// The request head a filter sees, moved into the store for one call.
#[derive(Debug)]
pub struct RequestHead {
    /// Method, URI, version, headers.
    pub parts: http::request::Parts,
    /// The client's address.
    pub client: SocketAddr,
    /// `http` or `https`.
    pub scheme: &'static str,
}

/// The response head a filter sees.
#[derive(Debug)]
pub struct ResponseHead {
    /// Status, version, headers.
    pub parts: http::response::Parts,
}

/// Shared by every instance of one filter name: identity, KV, counters.
#[derive(Debug)]
pub struct FilterContext {
    /// The filter's name (its file stem).
    pub name: Arc<str>,
    /// Its key-value namespace.
    pub kv: Arc<KvStore>,
    counters: Mutex<HashMap<String, metrics::Counter>>,
    /// 0.2's labelled series (counted with `counters` against
    /// `max_metrics`).
    series: Mutex<HashMap<v2::SeriesKey, v2::Series>>,
}

impl FilterContext {
    /// The metric series the filter has made, `name{labels}` (for
    /// `sluicegate filter test`).
    pub fn series_names(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .counters
            .lock()
            .keys()
            .map(|n| format!("counter {n}"))
            .collect();
        for (kind, name, labels) in self.series.lock().keys() {
            let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
            out.push(format!("{kind:?} {name}{{{}}}", labels.join(",")).to_lowercase());
        }
        out.sort();
        out
    }

    /// A context for `name` with its KV namespace.
    pub fn new(name: Arc<str>, kv: Arc<KvStore>) -> FilterContext {
        FilterContext {
            name,
            kv,
            counters: Mutex::new(HashMap::new()),
            series: Mutex::new(HashMap::new()),
        }
    }
}

/// The data of one filter instance's store.
pub struct HostState {
    /// WASI's resources.
    pub table: ResourceTable,
    /// The heads lent to the call in progress (a store makes one call at a
    /// time); the guest holds `borrow` handles to them (see [`Lent`]).
    lent_request: Option<RequestHead>,
    lent_response: Option<ResponseHead>,
    /// An empty WASI context: no preopens, no env, no sockets, no stdin;
    /// stdout and stderr go to the proxy's log (see `stdio`).
    wasi: WasiCtx,
    /// The memory cap and the memory in use.
    pub limits: MemoryCap,
    /// The filter's shared context.
    pub ctx: Arc<FilterContext>,
    /// What the version's manifest grants.
    pub grants: Arc<Grants>,
    /// How to undo the head edits of the call in progress (see [`Edits`]).
    pub edits: Edits,
    /// CPU accounting of the call in progress (see `compute`).
    pub meter: super::compute::CallMeter,
    /// The request's exchange, lent to a 0.2 call (see `exchange`).
    pub exchange: Option<SharedExchange>,
    /// Callouts (see `callout`): the version's limits, what this request's
    /// (or tick's) calls have used, and whether calls are allowed on this
    /// call at all (not in `init`, nor for a shadow version).
    pub callout: CalloutState,
}

/// The callout side of one store.
pub struct CalloutState {
    /// Does the version's component import `upstream-client`?
    pub imported: bool,
    /// The version's limits.
    pub limits: crate::config::CalloutLimits,
    /// Used so far by the request (or tick) in progress.
    pub spent: super::callout::Spent,
    /// The proxy's upstreams, once it runs.
    pub service: Arc<arc_swap::ArcSwapOption<super::callout::CalloutService>>,
    /// False while calls are refused (`init`, shadow calls).
    pub enabled: bool,
    /// True while `init` runs (`timer.request-tick` is allowed then only).
    pub initializing: bool,
    /// The tick interval `init` asked for, ms.
    pub tick_ms: Option<u32>,
}

impl HostState {
    /// Lend the heads to the call about to run (see [`Lent`]); its undo
    /// log starts empty.
    pub fn lend(
        &mut self,
        req: RequestHead,
        resp: Option<ResponseHead>,
        exchange: Option<SharedExchange>,
    ) {
        self.lent_request = Some(req);
        self.lent_response = resp;
        // The request's callout budget so far (per filter, every phase);
        // only a version that can call out pays for the lookup.
        if self.callout.imported {
            self.callout.spent = match &exchange {
                Some(ex) => ex.lock().callouts_spent(&self.ctx.name),
                None => Default::default(),
            };
        }
        self.exchange = exchange;
        self.edits = Edits::default();
    }

    /// Take the heads back after the call, with its undo log. A head is
    /// missing only if the guest somehow never had it lent.
    pub fn take_back(&mut self) -> (Option<RequestHead>, Option<ResponseHead>, Edits) {
        if let Some(ex) = self.exchange.take() {
            if self.callout.spent.calls > 0 {
                ex.lock()
                    .set_callouts_spent(&self.ctx.name, self.callout.spent);
            }
        }
        (
            self.lent_request.take(),
            self.lent_response.take(),
            std::mem::take(&mut self.edits),
        )
    }
}

impl HostState {
    /// State for a new instance of the filter behind `ctx`.
    pub fn new(
        ctx: Arc<FilterContext>,
        grants: Arc<Grants>,
        memory_cap: usize,
        meter: super::compute::CallMeter,
        callout: CalloutState,
    ) -> HostState {
        HostState {
            callout,
            table: ResourceTable::new(),
            lent_request: None,
            lent_response: None,
            grants,
            edits: Edits::default(),
            meter,
            exchange: None,
            wasi: WasiCtx::builder()
                .stdout(LogStdio::new(ctx.name.clone(), Stdio::Stdout))
                .stderr(LogStdio::new(ctx.name.clone(), Stdio::Stderr))
                .build(),
            limits: MemoryCap {
                cap: memory_cap,
                used: 0,
            },
            ctx,
        }
    }
}

/// Caps the linear memory of one store and tracks what it uses.
#[derive(Debug)]
pub struct MemoryCap {
    /// The most bytes all memories of the store may hold together.
    pub cap: usize,
    /// Bytes held now.
    pub used: usize,
}

/// The error a store raises when its filter hits its memory cap.
pub const MEMORY_CAP_ERROR: &str = "filter exceeded its memory cap";

impl wasmtime::ResourceLimiter for MemoryCap {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let next = self.used.saturating_sub(current).saturating_add(desired);
        if next > self.cap {
            return Err(wasmtime::format_err!(
                "{MEMORY_CAP_ERROR} of {} MiB (wanted {} bytes)",
                self.cap >> 20,
                next
            ));
        }
        self.used = next;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// Parse a header a filter wants to write, enforcing the size limits.
pub fn checked_header(
    headers: &HeaderMap,
    name: &str,
    value: &str,
    adding: bool,
) -> Result<(HeaderName, HeaderValue), String> {
    let name = HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| format!("invalid header name {name:?}"))?;
    if value.len() > MAX_HEADER_VALUE {
        return Err(format!(
            "value of {name} is {} bytes; the limit is {MAX_HEADER_VALUE}",
            value.len()
        ));
    }
    let value =
        HeaderValue::from_str(value).map_err(|_| format!("invalid value for header {name}"))?;
    let grows = adding || !headers.contains_key(&name);
    if grows && headers.len() >= MAX_HEADER_FIELDS {
        return Err(format!(
            "too many header fields (limit {MAX_HEADER_FIELDS})"
        ));
    }
    Ok((name, value))
}

fn first(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

fn all(headers: &HeaderMap, name: &str) -> Vec<String> {
    headers
        .get_all(name)
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect()
}

/// Count an action the manifest refused, by filter and kind.
pub(crate) fn denied(filter: &str, what: &'static str) {
    metrics::counter!("sluicegate_filter_denied_total", "filter" => filter.to_string(), "what" => what).increment(1);
}

/// Which head an edit touched.
#[derive(Debug, Clone, Copy)]
enum Side {
    Request,
    Response,
}

/// One undo step: what a head held before an edit.
#[derive(Debug)]
enum Undo {
    Header(Side, HeaderName, Vec<HeaderValue>),
    Uri(http::Uri),
    Method(http::Method),
    Status(http::StatusCode),
    /// A local's previous value (0.2).
    Local(SharedExchange, Arc<str>, String, Option<Vec<u8>>),
    /// Deferred response edits from this index on (0.2).
    Deferred(SharedExchange, usize),
}

/// The undo log of one call's head edits. A filter's edits take effect
/// only when its call returns normally with a valid action: after a trap,
/// a timeout or an invalid action, [`Edits::revert`] puts both heads back
/// as they were, so a failed filter under `fail_open` leaves no trace.
#[derive(Debug, Default)]
pub struct Edits(Vec<Undo>);

impl Edits {
    fn header(&mut self, side: Side, headers: &HeaderMap, name: &HeaderName) {
        let old = headers.get_all(name).iter().cloned().collect();
        self.0.push(Undo::Header(side, name.clone(), old));
    }

    /// True when the call edited nothing.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Undo every edit, newest first.
    pub fn revert(self, req: Option<&mut RequestHead>, mut resp: Option<&mut ResponseHead>) {
        let mut req = req;
        for undo in self.0.into_iter().rev() {
            match undo {
                Undo::Header(side, name, old) => {
                    let headers = match side {
                        Side::Request => req.as_deref_mut().map(|h| &mut h.parts.headers),
                        Side::Response => resp.as_deref_mut().map(|h| &mut h.parts.headers),
                    };
                    if let Some(headers) = headers {
                        headers.remove(&name);
                        for v in old {
                            headers.append(name.clone(), v);
                        }
                    }
                }
                Undo::Uri(uri) => {
                    if let Some(h) = req.as_deref_mut() {
                        h.parts.uri = uri;
                    }
                }
                Undo::Method(method) => {
                    if let Some(h) = req.as_deref_mut() {
                        h.parts.method = method;
                    }
                }
                Undo::Status(status) => {
                    if let Some(h) = resp.as_deref_mut() {
                        h.parts.status = status;
                    }
                }
                Undo::Local(ex, filter, key, old) => ex.lock().restore_local(&filter, key, old),
                Undo::Deferred(ex, from) => ex.lock().deferred.truncate(from),
            }
        }
    }
}

/// The header-reading and -writing side of the host, with the manifest's
/// checks and the undo log, shared by both heads.
impl HostState {
    fn read_one(&self, headers: &HeaderMap, name: &str) -> Option<String> {
        if header_listed(&self.grants.hide_headers, name) {
            return None;
        }
        first(headers, name)
    }

    fn read_all(&self, headers: &HeaderMap, name: &str) -> Vec<String> {
        if header_listed(&self.grants.hide_headers, name) {
            return Vec::new();
        }
        all(headers, name)
    }

    fn read_names(&self, headers: &HeaderMap) -> Vec<String> {
        headers
            .keys()
            .map(|k| k.as_str())
            .filter(|k| !header_listed(&self.grants.hide_headers, k))
            .map(str::to_string)
            .collect()
    }

    fn headers_mut(&mut self, side: Side, r: u32) -> Wr<&mut HeaderMap> {
        match side {
            Side::Request => Ok(&mut self
                .lent_mut(&Resource::<RequestHead>::new_borrow(r))?
                .parts
                .headers),
            Side::Response => Ok(&mut self
                .lent_mut(&Resource::<ResponseHead>::new_borrow(r))?
                .parts
                .headers),
        }
    }

    fn protected(&self, name: &str) -> bool {
        let hit = header_listed(&self.grants.protect_headers, name);
        if hit {
            denied(&self.ctx.name, "write_header");
        }
        hit
    }

    fn write(
        &mut self,
        side: Side,
        r: u32,
        name: &str,
        value: &str,
        adding: bool,
    ) -> Wr<Result<(), String>> {
        if self.protected(name) {
            return Ok(Err(format!(
                "header {name:?} is protected by the filter's policy"
            )));
        }
        let headers = self.headers_mut(side, r)?;
        let (n, v) = match checked_header(headers, name, value, adding) {
            Ok(pair) => pair,
            Err(e) => return Ok(Err(e)),
        };
        let mut edits = std::mem::take(&mut self.edits);
        let headers = self.headers_mut(side, r)?;
        edits.header(side, headers, &n);
        if adding {
            headers.append(n, v);
        } else {
            headers.insert(n, v);
        }
        self.edits = edits;
        Ok(Ok(()))
    }

    fn erase(&mut self, side: Side, r: u32, name: &str) -> Wr<()> {
        let Ok(n) = HeaderName::from_bytes(name.as_bytes()) else {
            return Ok(());
        };
        if self.protected(name) {
            return Ok(());
        }
        let mut edits = std::mem::take(&mut self.edits);
        let headers = self.headers_mut(side, r)?;
        if headers.contains_key(&n) {
            edits.header(side, headers, &n);
            headers.remove(n);
        }
        self.edits = edits;
        Ok(())
    }
}

type Wr<T> = wasmtime::Result<T>;

/// A head the host lends to one guest call: it waits in its own slot of
/// the store's state, not in the resource table, and the guest's `borrow`
/// handle carries a fixed rep. Handles are the component model's: the guest
/// cannot forge one, nor keep a borrow past the call; between calls the
/// slots are empty and any use fails. (The table boxed each head and
/// downcast it at every host call: 1,155 instructions per filtered request.)
pub trait Lent: Sized + 'static {
    /// The rep of the handle the guest is given.
    const REP: u32;
    /// What it is, for errors.
    const WHAT: &'static str;
    /// Where the lent value waits.
    fn slot(state: &mut HostState) -> &mut Option<Self>;
    /// The same, to read.
    fn slot_ref(state: &HostState) -> &Option<Self>;
}

impl Lent for RequestHead {
    const REP: u32 = 1;
    const WHAT: &'static str = "request head";
    fn slot(state: &mut HostState) -> &mut Option<Self> {
        &mut state.lent_request
    }
    fn slot_ref(state: &HostState) -> &Option<Self> {
        &state.lent_request
    }
}

impl Lent for ResponseHead {
    const REP: u32 = 2;
    const WHAT: &'static str = "response head";
    fn slot(state: &mut HostState) -> &mut Option<Self> {
        &mut state.lent_response
    }
    fn slot_ref(state: &HostState) -> &Option<Self> {
        &state.lent_response
    }
}

fn not_lent<T: Lent>() -> wasmtime::Error {
    wasmtime::format_err!("no {} is lent to this call", T::WHAT)
}

impl HostState {
    /// The value `r` names, if it is lent now.
    fn lent<T: Lent>(&self, r: &Resource<T>) -> Wr<&T> {
        match T::slot_ref(self) {
            Some(v) if r.rep() == T::REP => Ok(v),
            _ => Err(not_lent::<T>()),
        }
    }
    fn lent_mut<T: Lent>(&mut self, r: &Resource<T>) -> Wr<&mut T> {
        match T::slot(self) {
            Some(v) if r.rep() == T::REP => Ok(v),
            _ => Err(not_lent::<T>()),
        }
    }
    fn req(&self, r: &Resource<RequestHead>) -> Wr<&RequestHead> {
        self.lent(r)
    }
    fn req_mut(&mut self, r: &Resource<RequestHead>) -> Wr<&mut RequestHead> {
        self.lent_mut(r)
    }
    fn resp(&self, r: &Resource<ResponseHead>) -> Wr<&ResponseHead> {
        self.lent(r)
    }
    fn resp_mut(&mut self, r: &Resource<ResponseHead>) -> Wr<&mut ResponseHead> {
        self.lent_mut(r)
    }
}

impl HostState {
    /// Replace the request's path and query (both contracts' `set-path`).
    fn replace_path(&mut self, r: &Resource<RequestHead>, path: &str) -> Wr<Result<(), String>> {
        if !path.starts_with('/') {
            return Ok(Err(format!("path {path:?} must start with '/'")));
        }
        let pq = match http::uri::PathAndQuery::try_from(path) {
            Ok(pq) => pq,
            Err(e) => return Ok(Err(format!("invalid path {path:?}: {e}"))),
        };
        let head = self.req_mut(r)?;
        let mut parts = head.parts.uri.clone().into_parts();
        parts.path_and_query = Some(pq);
        match http::Uri::from_parts(parts) {
            Ok(uri) => {
                let old = std::mem::replace(&mut head.parts.uri, uri);
                self.edits.0.push(Undo::Uri(old));
                Ok(Ok(()))
            }
            Err(e) => Ok(Err(format!("invalid path {path:?}: {e}"))),
        }
    }
}

impl types::Host for HostState {}

impl types::HostRequestHead for HostState {
    fn method(&mut self, r: Resource<RequestHead>) -> Wr<String> {
        Ok(self.req(&r)?.parts.method.as_str().to_string())
    }
    fn path(&mut self, r: Resource<RequestHead>) -> Wr<String> {
        let uri = &self.req(&r)?.parts.uri;
        Ok(uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
            .to_string())
    }
    fn set_path(&mut self, r: Resource<RequestHead>, path: String) -> Wr<Result<(), String>> {
        self.replace_path(&r, &path)
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
    fn scheme(&mut self, r: Resource<RequestHead>) -> Wr<String> {
        Ok(self.req(&r)?.scheme.to_string())
    }
    fn client_addr(&mut self, r: Resource<RequestHead>) -> Wr<String> {
        Ok(self.req(&r)?.client.to_string())
    }
    fn header(&mut self, r: Resource<RequestHead>, name: String) -> Wr<Option<String>> {
        Ok(self.read_one(&self.req(&r)?.parts.headers, &name))
    }
    fn header_all(&mut self, r: Resource<RequestHead>, name: String) -> Wr<Vec<String>> {
        Ok(self.read_all(&self.req(&r)?.parts.headers, &name))
    }
    fn header_names(&mut self, r: Resource<RequestHead>) -> Wr<Vec<String>> {
        Ok(self.read_names(&self.req(&r)?.parts.headers))
    }
    fn set_header(
        &mut self,
        r: Resource<RequestHead>,
        name: String,
        value: String,
    ) -> Wr<Result<(), String>> {
        self.write(Side::Request, r.rep(), &name, &value, false)
    }
    fn append_header(
        &mut self,
        r: Resource<RequestHead>,
        name: String,
        value: String,
    ) -> Wr<Result<(), String>> {
        self.write(Side::Request, r.rep(), &name, &value, true)
    }
    fn remove_header(&mut self, r: Resource<RequestHead>, name: String) -> Wr<()> {
        self.erase(Side::Request, r.rep(), &name)
    }
    fn drop(&mut self, _r: Resource<RequestHead>) -> Wr<()> {
        // Heads are only ever lent (borrowed); the host takes them back.
        Ok(())
    }
}

impl types::HostResponseHead for HostState {
    fn status(&mut self, r: Resource<ResponseHead>) -> Wr<u16> {
        Ok(self.resp(&r)?.parts.status.as_u16())
    }
    fn set_status(&mut self, r: Resource<ResponseHead>, status: u16) -> Wr<Result<(), String>> {
        match http::StatusCode::from_u16(status) {
            Ok(s) => {
                let old = std::mem::replace(&mut self.resp_mut(&r)?.parts.status, s);
                self.edits.0.push(Undo::Status(old));
                Ok(Ok(()))
            }
            Err(_) => Ok(Err(format!("invalid status {status}"))),
        }
    }
    fn header(&mut self, r: Resource<ResponseHead>, name: String) -> Wr<Option<String>> {
        Ok(self.read_one(&self.resp(&r)?.parts.headers, &name))
    }
    fn header_all(&mut self, r: Resource<ResponseHead>, name: String) -> Wr<Vec<String>> {
        Ok(self.read_all(&self.resp(&r)?.parts.headers, &name))
    }
    fn header_names(&mut self, r: Resource<ResponseHead>) -> Wr<Vec<String>> {
        Ok(self.read_names(&self.resp(&r)?.parts.headers))
    }
    fn set_header(
        &mut self,
        r: Resource<ResponseHead>,
        name: String,
        value: String,
    ) -> Wr<Result<(), String>> {
        self.write(Side::Response, r.rep(), &name, &value, false)
    }
    fn append_header(
        &mut self,
        r: Resource<ResponseHead>,
        name: String,
        value: String,
    ) -> Wr<Result<(), String>> {
        self.write(Side::Response, r.rep(), &name, &value, true)
    }
    fn remove_header(&mut self, r: Resource<ResponseHead>, name: String) -> Wr<()> {
        self.erase(Side::Response, r.rep(), &name)
    }
    fn drop(&mut self, _r: Resource<ResponseHead>) -> Wr<()> {
        Ok(())
    }
}

impl log::Host for HostState {
    fn write(&mut self, level: types::LogLevel, message: String) -> Wr<()> {
        let mut message = message;
        if message.len() > MAX_LOG_LINE {
            let mut cut = MAX_LOG_LINE;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        // A filter must not forge log lines or terminal escapes: control
        // characters are written escaped (see docs/security.md).
        if message.chars().any(char::is_control) {
            message = crate::protect::escape_controls(&message);
        }
        let filter = &*self.ctx.name;
        match level {
            types::LogLevel::Trace => tracing::trace!(filter, "{message}"),
            types::LogLevel::Debug => tracing::debug!(filter, "{message}"),
            types::LogLevel::Info => tracing::info!(filter, "{message}"),
            types::LogLevel::Warn => tracing::warn!(filter, "{message}"),
            types::LogLevel::Error => tracing::error!(filter, "{message}"),
        }
        Ok(())
    }
}

impl kv::Host for HostState {
    // Each call: the backend's answer under `[filters.kv] on_error` (see
    // `KvStore::answer`); `?` traps when it is fail_closed.
    fn get(&mut self, key: String) -> Wr<Option<Vec<u8>>> {
        let kv = &self.ctx.kv;
        Ok(kv.answer(kv.get_blocking(&key), |_| None)?)
    }
    fn set(&mut self, key: String, value: Vec<u8>, ttl_ms: Option<u64>) -> Wr<()> {
        let kv = &self.ctx.kv;
        if !kv.answer(kv.set_blocking(key, value, ttl_ms), |_| false)? {
            tracing::warn!(filter = %self.ctx.name, "kv set dropped: store full, entry too large or backend unavailable");
        }
        Ok(())
    }
    fn delete(&mut self, key: String) -> Wr<bool> {
        let kv = &self.ctx.kv;
        Ok(kv.answer(kv.delete_blocking(&key), |_| false)?)
    }
    fn increment(
        &mut self,
        key: String,
        delta: i64,
        ttl_ms: Option<u64>,
    ) -> Wr<Result<i64, String>> {
        let kv = &self.ctx.kv;
        let outcome = kv.increment_blocking(key, delta, ttl_ms);
        Ok(kv.answer(outcome, |e| Err(e.to_string()))?)
    }
    fn compare_and_swap(
        &mut self,
        key: String,
        expected: Option<Vec<u8>>,
        value: Vec<u8>,
        ttl_ms: Option<u64>,
    ) -> Wr<bool> {
        let kv = &self.ctx.kv;
        let outcome = kv.compare_and_swap_blocking(key, expected, value, ttl_ms);
        Ok(kv.answer(outcome, |_| false)?)
    }
}

impl wit_metrics::Host for HostState {
    fn counter_add(&mut self, name: String, delta: u64) -> Wr<()> {
        let mut counters = self.ctx.counters.lock();
        if let Some(c) = counters.get(&name) {
            c.increment(delta);
            return Ok(());
        }
        if counters.len() as u64 >= self.grants.max_metrics || name.len() > 128 {
            denied(&self.ctx.name, "metric");
            return Ok(());
        }
        let c = metrics::counter!("sluicegate_filter_counter_total", "filter" => self.ctx.name.to_string(), "name" => name.clone());
        c.increment(delta);
        counters.insert(name, c);
        Ok(())
    }
}

fn process_start() -> Instant {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *START.get_or_init(Instant::now)
}

impl env::Host for HostState {
    fn now_ms(&mut self) -> Wr<u64> {
        Ok(SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0))
    }
    fn monotonic_ns(&mut self) -> Wr<u64> {
        Ok(process_start().elapsed().as_nanos() as u64)
    }
    fn random_u64(&mut self) -> Wr<u64> {
        Ok(fastrand::u64(..))
    }
}
