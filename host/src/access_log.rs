//! The access log: one line per request, in the Common Log Format (with
//! the referer, user agent, route, upstream and duration after it) or as
//! JSON, to stdout, stderr or a file.
//!
//! The data path never waits on the log: a worker formats its line and
//! hands it to a bounded queue; one writer thread writes and flushes. When
//! the queue is full (the disk cannot keep up) the line is dropped and
//! counted in `sluicegate_access_log_dropped_total`.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use http::{HeaderValue, Method, Request, Response, Uri, Version};

use crate::config::{AccessLogConfig, AccessLogFormat};
use crate::proxy::ConnInfo;

/// Lines waiting for the writer before new ones are dropped.
const QUEUE: usize = 16 * 1024;

/// The process's access log, set once at start.
static LOG: OnceLock<AccessLog> = OnceLock::new();

struct AccessLog {
    format: AccessLogFormat,
    tx: SyncSender<String>,
}

/// The upstream that served a response, for the log (a response extension
/// set by the proxy).
#[derive(Debug, Clone)]
pub struct UpstreamName(pub Arc<str>);

/// Open the log and start its writer thread. Call once, before serving.
pub fn init(config: &AccessLogConfig) -> anyhow::Result<()> {
    let out: Box<dyn Write + Send> = match config.path.as_str() {
        "stdout" => Box::new(std::io::stdout()),
        "stderr" => Box::new(std::io::stderr()),
        path => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("proxy.access_log: cannot open {path}"))?,
        ),
    };
    let (tx, rx) = sync_channel(QUEUE);
    std::thread::Builder::new()
        .name("sluicegate-access-log".into())
        .spawn(move || write_lines(rx, out))
        .context("starting the access log writer")?;
    let _ = LOG.set(AccessLog {
        format: config.format,
        tx,
    });
    Ok(())
}

/// The writer: a burst of lines, then one flush.
fn write_lines(rx: Receiver<String>, out: Box<dyn Write + Send>) {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
    while let Ok(line) = rx.recv() {
        let _ = out.write_all(line.as_bytes());
        while let Ok(line) = rx.try_recv() {
            let _ = out.write_all(line.as_bytes());
        }
        if let Err(e) = out.flush() {
            tracing::warn!(error = %e, "access log write failed");
        }
    }
}

/// What the log needs from the request, taken before the proxy consumes it.
pub struct Entry {
    started: Instant,
    time: SystemTime,
    client: SocketAddr,
    method: Method,
    uri: Uri,
    version: Version,
    host: Option<HeaderValue>,
    referer: Option<HeaderValue>,
    agent: Option<HeaderValue>,
    request_id: Option<HeaderValue>,
    /// The request's trace, with `[tracing]` (set by the proxy).
    pub trace_id: Option<crate::telemetry::TraceId>,
}

/// Is there an access log?
pub fn enabled() -> bool {
    LOG.get().is_some()
}

/// Start an entry for `req`, or `None` when there is no access log.
///
/// Boxed: the entry lives across the whole request, and inline it would add
/// its size to every request's future, logged or not.
pub fn begin<B>(req: &Request<B>, conn: &ConnInfo) -> Option<Box<Entry>> {
    LOG.get()?;
    let h = req.headers();
    Some(Box::new(Entry {
        started: Instant::now(),
        time: SystemTime::now(),
        client: conn.client,
        method: req.method().clone(),
        uri: req.uri().clone(),
        version: req.version(),
        host: h.get(http::header::HOST).cloned(),
        referer: h.get(http::header::REFERER).cloned(),
        agent: h.get(http::header::USER_AGENT).cloned(),
        request_id: h.get(crate::filter::exchange::X_REQUEST_ID).cloned(),
        trace_id: None,
    }))
}

impl Entry {
    /// Format the line for `resp` and queue it.
    pub fn finish<B>(self: Box<Self>, resp: &Response<B>, route: &str) {
        let Some(log) = LOG.get() else { return };
        let upstream = resp.extensions().get::<UpstreamName>().map(|u| &*u.0);
        let bytes = resp
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let line = match log.format {
            AccessLogFormat::Common => self.common(resp.status().as_u16(), bytes, route, upstream),
            AccessLogFormat::Json => self.json(resp.status().as_u16(), bytes, route, upstream),
        };
        if let Err(TrySendError::Full(_)) = log.tx.try_send(line) {
            metrics::counter!("sluicegate_access_log_dropped_total").increment(1);
        }
    }

    /// Format the line of a gRPC call once it has ended (its status known
    /// from the trailers: `grpc=N` at the end of a common line,
    /// `"grpc_status": N` in JSON; `-`/`null` when none came) and queue it.
    pub fn finish_grpc(
        self: Box<Self>,
        status: u16,
        route: &str,
        upstream: Option<&str>,
        grpc_status: Option<u32>,
    ) {
        let Some(log) = LOG.get() else { return };
        let mut line = match log.format {
            AccessLogFormat::Common => self.common(status, None, route, upstream),
            AccessLogFormat::Json => self.json(status, None, route, upstream),
        };
        // Both formats end their line with a newline; JSON with `}` before it.
        line.pop();
        let code = grpc_status.map(|c| c.to_string());
        match log.format {
            AccessLogFormat::Common => {
                line.push_str(" grpc=");
                line.push_str(code.as_deref().unwrap_or("-"));
            }
            AccessLogFormat::Json => {
                line.pop();
                line.push_str(",\"grpc_status\":");
                line.push_str(code.as_deref().unwrap_or("null"));
                line.push('}');
            }
        }
        line.push('\n');
        if let Err(TrySendError::Full(_)) = log.tx.try_send(line) {
            metrics::counter!("sluicegate_access_log_dropped_total").increment(1);
        }
    }

    fn ms(&self) -> f64 {
        self.started.elapsed().as_secs_f64() * 1e3
    }

    /// `client - - [10/Oct/2000:13:55:36 +0000] "GET /x HTTP/1.1" 200 2326
    /// "referer" "agent" route=R upstream=U ms=1.234 rid=ID`, then
    /// `trace=<32 hex>` with `[tracing]`.
    fn common(
        &self,
        status: u16,
        bytes: Option<u64>,
        route: &str,
        upstream: Option<&str>,
    ) -> String {
        let bytes = bytes.map_or("-".to_string(), |b| b.to_string());
        let trace = self
            .trace_id
            .map_or(String::new(), |t| format!(" trace={t}"));
        format!(
            "{} - - [{}] \"{} {} {:?}\" {status} {bytes} \"{}\" \"{}\" route={} upstream={} ms={:.3} rid={}{trace}\n",
            self.client.ip(),
            clf_time(self.time),
            self.method,
            quoted(self.uri.to_string().as_bytes()),
            self.version,
            header(&self.referer),
            header(&self.agent),
            quoted(route.as_bytes()),
            upstream.unwrap_or("-"),
            self.ms(),
            self.request_id
                .as_ref()
                .map_or("-".to_string(), |v| quoted(v.as_bytes())),
        )
    }

    fn json(&self, status: u16, bytes: Option<u64>, route: &str, upstream: Option<&str>) -> String {
        let text = |v: &Option<HeaderValue>| {
            v.as_ref()
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        };
        let mut value = serde_json::json!({
            "time": rfc3339(self.time),
            "client": self.client.ip().to_string(),
            "method": self.method.as_str(),
            "uri": self.uri.to_string(),
            "version": format!("{:?}", self.version),
            "host": text(&self.host),
            "status": status,
            "bytes": bytes,
            "duration_ms": (self.ms() * 1000.0).round() / 1000.0,
            "route": route,
            "upstream": upstream,
            "referer": text(&self.referer),
            "user_agent": text(&self.agent),
            "request_id": text(&self.request_id),
        });
        if let (Some(t), Some(obj)) = (self.trace_id, value.as_object_mut()) {
            obj.insert("trace_id".into(), t.to_string().into());
        }
        let mut line = value.to_string();
        line.push('\n');
        line
    }
}

/// A header for a quoted CLF field, `-` when absent.
fn header(v: &Option<HeaderValue>) -> String {
    match v {
        Some(v) => quoted(v.as_bytes()),
        None => "-".to_string(),
    }
}

/// Escape `"`, `\` and bytes outside printable ASCII as `\xHH`, so a line
/// stays one line and its quoted fields stay parseable.
fn quoted(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len());
    for &b in bytes {
        match b {
            b'"' => s.push_str("\\\""),
            b'\\' => s.push_str("\\\\"),
            0x20..=0x7e => s.push(b as char),
            _ => s.push_str(&format!("\\x{b:02x}")),
        }
    }
    s
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian
/// calendar (H. Hinnant's `civil_from_days`).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// (y, m, d, H, M, S, millis) in UTC.
fn utc(t: SystemTime) -> (i64, u32, u32, u64, u64, u64, u32) {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (y, m, day) = civil((secs / 86_400) as i64);
    let rem = secs % 86_400;
    (
        y,
        m,
        day,
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_millis(),
    )
}

/// `10/Oct/2000:13:55:36 +0000`.
fn clf_time(t: SystemTime) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let (y, m, d, hh, mm, ss, _) = utc(t);
    let mon = MONTHS[(m as usize).saturating_sub(1) % 12];
    format!("{d:02}/{mon}/{y}:{hh:02}:{mm:02}:{ss:02} +0000")
}

/// `2000-10-10T13:55:36.123Z`.
fn rfc3339(t: SystemTime) -> String {
    let (y, m, d, hh, mm, ss, ms) = utc(t);
    format!("{y}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}.{ms:03}Z")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn times_format_in_utc() {
        // 2000-10-10T13:55:36Z
        let t = UNIX_EPOCH + Duration::from_millis(971_186_136_250);
        assert_eq!(clf_time(t), "10/Oct/2000:13:55:36 +0000");
        assert_eq!(rfc3339(t), "2000-10-10T13:55:36.250Z");
        // A leap day.
        let t = UNIX_EPOCH + Duration::from_secs(1_709_164_800);
        assert_eq!(rfc3339(t), "2024-02-29T00:00:00.000Z");
    }

    #[test]
    fn quoting_keeps_a_line_one_line() {
        assert_eq!(quoted(b"a\"b\\c\nd\xff"), "a\\\"b\\\\c\\x0ad\\xff");
    }
}
