//! `POST /cache/purge` across the fleet (`[redis] purge = true`): the
//! replica that gets the request purges its own cache, then publishes the
//! request (query and body) on the channel `P purge`; every other replica
//! runs the same purge on its cache when the message arrives. Each replica
//! keeps its own HTTP cache: only the purge travels.
//!
//! The message is the request as given, so whatever the purge endpoint
//! understands (URL, prefix, ...) means the same on every replica. A
//! replica skips its own messages (by `node`). Delivery is pub/sub: a
//! replica cut off from Redis at that moment misses the purge (the
//! response says whether it was published: `sluicegate-fleet-purge`).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};

use super::{link, Op, RedisLink};
use crate::body::{self, ProxyBody};
use crate::cache::HttpCache;
use crate::proxy::Snapshot;

/// Largest purge body forwarded.
const MAX_BODY: usize = 64 * 1024;

/// The header on the purge response that says what the fan-out did.
pub const HEADER: &str = "sluicegate-fleet-purge";

#[derive(Serialize, Deserialize)]
struct Message {
    node: u64,
    query: Option<String>,
    body: String,
}

/// Serve `POST /cache/purge`: here, then (when enabled) on every replica.
pub async fn handle(cache: &HttpCache, req: Request<Incoming>) -> Response<ProxyBody> {
    let Some(link) = link().filter(|l| l.config.purge) else {
        return crate::cache::admin::purge_request(cache, req).await;
    };
    let (parts, incoming) = req.into_parts();
    let Ok(collected) = Limited::new(incoming, MAX_BODY).collect().await else {
        return body::text_response(http::StatusCode::BAD_REQUEST, "purge body too large");
    };
    let bytes = collected.to_bytes();
    let query = parts.uri.query().map(str::to_string);
    let local = Request::from_parts(parts, Full::new(bytes.clone()));
    let mut resp = crate::cache::admin::purge_request(cache, local).await;
    if resp.status().is_success() {
        let message = Message {
            node: link.node,
            query,
            body: String::from_utf8_lossy(&bytes).into_owned(),
        };
        let outcome = publish(link, &message).await;
        resp.headers_mut().insert(
            HEADER,
            HeaderValue::from_static(if outcome { "published" } else { "failed" }),
        );
    }
    resp
}

/// Publish `message`; false when Redis did not take it.
async fn publish(link: &RedisLink, message: &Message) -> bool {
    let payload = serde_json::to_string(message).unwrap_or_default();
    let channel = link.key("purge");
    let timeout = Duration::from_millis(link.config.timeout_ms);
    let sent = link
        .run(Op::Purge, timeout, move |mut c| async move {
            redis::cmd("PUBLISH")
                .arg(channel)
                .arg(payload)
                .query_async::<i64>(&mut c)
                .await
        })
        .await;
    metrics::counter!("sluicegate_fleet_purges_total", "direction" => "published", "outcome" => if sent.is_ok() { "ok" } else { "error" }).increment(1);
    sent.is_ok()
}

/// Subscribe to the fleet's purges and apply the others' to the live
/// snapshot's cache, resubscribing (with backoff) when the connection
/// breaks. Runs on the link's runtime for the life of the process.
pub fn subscribe(snapshot: Arc<ArcSwap<Snapshot>>) {
    let Some(link) = link().filter(|l| l.config.purge) else {
        return;
    };
    let link = link.clone();
    let handle = link.handle.clone();
    handle.spawn(async move {
        let mut backoff = Duration::from_millis(100);
        loop {
            let outcome = listen(&link, &snapshot).await;
            link.health.subscribed.store(false, Ordering::Relaxed);
            match outcome {
                Ok(()) => backoff = Duration::from_millis(100),
                Err(e) => tracing::debug!(error = %e, "redis: purge subscription failed"),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    });
}

/// One subscription, until its connection ends.
async fn listen(link: &RedisLink, snapshot: &ArcSwap<Snapshot>) -> redis::RedisResult<()> {
    let connect = Duration::from_millis(link.config.connect_timeout_ms);
    let mut pubsub = match tokio::time::timeout(connect, link.client.get_async_pubsub()).await {
        Ok(p) => p?,
        Err(_) => return Err(std::io::Error::from(std::io::ErrorKind::TimedOut).into()),
    };
    pubsub.subscribe(link.key("purge")).await?;
    link.health.subscribed.store(true, Ordering::Relaxed);
    tracing::info!("redis: subscribed to fleet purges");
    let mut messages = pubsub.on_message();
    while let Some(msg) = messages.next().await {
        let Ok(payload) = msg.get_payload::<String>() else {
            continue;
        };
        let Ok(message) = serde_json::from_str::<Message>(&payload) else {
            tracing::warn!("redis: a purge message that is not ours; ignored");
            continue;
        };
        if message.node == link.node {
            continue;
        }
        apply(&snapshot.load().cache, message).await;
    }
    Ok(())
}

/// Run another replica's purge on this one's cache, through the same
/// endpoint code as a local `POST /cache/purge`.
async fn apply(cache: &HttpCache, message: Message) {
    let uri = match &message.query {
        Some(q) => format!("/cache/purge?{q}"),
        None => "/cache/purge".to_string(),
    };
    let req = Request::post(uri).body(Full::new(Bytes::from(message.body)));
    let status = match req {
        Ok(req) => crate::cache::admin::purge_request(cache, req)
            .await
            .status(),
        Err(_) => http::StatusCode::BAD_REQUEST,
    };
    let outcome = if status.is_success() { "ok" } else { "error" };
    metrics::counter!("sluicegate_fleet_purges_total", "direction" => "received", "outcome" => outcome).increment(1);
    tracing::info!(status = status.as_u16(), "cache purge from another replica");
}
