//! The active gRPC health check (`[upstream.health] check = "grpc"`):
//! `grpc.health.v1.Health/Check` for `grpc_service` on a fresh HTTP/2
//! connection to each endpoint (h2c, or TLS with ALPN `h2` as the upstream
//! is configured). It passes when the call succeeds (`grpc-status: 0`) and
//! the answer is `SERVING`; `NOT_SERVING`, `SERVICE_UNKNOWN`, any error
//! status, a non-200 answer or no answer within `timeout_ms` fail it.
//!
//! The two messages are small enough to write and read by hand
//! (protobuf: `HealthCheckRequest { string service = 1; }`,
//! `HealthCheckResponse { ServingStatus status = 1; }`).

use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{header, Request};
use http_body_util::BodyExt;

use super::{Endpoint, Upstream};
use crate::body;
use crate::upstream::h2;

/// The method called.
pub const PATH: &str = "/grpc.health.v1.Health/Check";
/// `ServingStatus.SERVING`.
const SERVING: u64 = 1;

/// Ask `ep` whether `service` is serving. `Err` says why not.
pub async fn probe(
    up: &Upstream,
    ep: &Endpoint,
    service: &str,
    timeout: Duration,
) -> Result<(), String> {
    let target = h2::Target {
        addr: &ep.addr,
        host: ep.authority.host(),
        tls: up.tls.as_ref(),
        settings: &up.http2,
        connect_timeout: timeout,
    };
    let mut sender = h2::open(&target).await?;
    let scheme = if up.tls.is_some() { "https" } else { "http" };
    let req = Request::post(format!("{scheme}://{}{PATH}", ep.authority))
        .version(http::Version::HTTP_2)
        .header(header::CONTENT_TYPE, "application/grpc")
        .header(header::TE, "trailers")
        .header(header::USER_AGENT, "sluicegate-health")
        .body(body::full(request_message(service)))
        .map_err(|e| e.to_string())?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| crate::upstream::error_chain(&e))?;
    if resp.status() != http::StatusCode::OK {
        return Err(format!("HTTP {}", resp.status()));
    }
    if let Some(code) = resp.headers().get("grpc-status") {
        return Err(format!("grpc-status {code:?} (trailers-only)"));
    }
    let got = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| crate::upstream::error_chain(&e))?;
    let code = got
        .trailers()
        .and_then(|t| t.get("grpc-status"))
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    if code.as_deref() != Some("0") {
        return Err(format!("grpc-status {code:?}"));
    }
    match serving_status(got.to_bytes()) {
        Some(SERVING) => Ok(()),
        Some(other) => Err(format!("serving status {other} (1 is SERVING)")),
        None => Err("malformed HealthCheckResponse".into()),
    }
}

/// One length-prefixed `HealthCheckRequest`.
pub fn request_message(service: &str) -> Bytes {
    let mut msg = BytesMut::new();
    if !service.is_empty() {
        msg.put_u8(0x0a); // field 1, length-delimited
        put_varint(&mut msg, service.len() as u64);
        msg.put_slice(service.as_bytes());
    }
    let mut frame = BytesMut::with_capacity(5 + msg.len());
    frame.put_u8(0); // not compressed
    frame.put_u32(msg.len() as u32);
    frame.put_slice(&msg);
    frame.freeze()
}

fn put_varint(b: &mut BytesMut, mut v: u64) {
    while v >= 0x80 {
        b.put_u8((v as u8) | 0x80);
        v >>= 7;
    }
    b.put_u8(v as u8);
}

fn varint(b: &mut Bytes) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        if !b.has_remaining() {
            return None;
        }
        let byte = b.get_u8();
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// The `status` of the first length-prefixed `HealthCheckResponse` in
/// `body` (0, `UNKNOWN`, when the field is absent).
pub fn serving_status(mut body: Bytes) -> Option<u64> {
    if body.len() < 5 || body[0] != 0 {
        return None;
    }
    body.advance(1);
    let len = body.get_u32() as usize;
    if body.len() < len {
        return None;
    }
    let mut msg = body.split_to(len);
    let mut status = 0;
    while msg.has_remaining() {
        let tag = varint(&mut msg)?;
        match (tag >> 3, tag & 7) {
            (1, 0) => status = varint(&mut msg)?,
            (_, 0) => {
                varint(&mut msg)?;
            }
            (_, 1) if msg.remaining() >= 8 => msg.advance(8),
            (_, 5) if msg.remaining() >= 4 => msg.advance(4),
            (_, 2) => {
                let n = varint(&mut msg)? as usize;
                if msg.remaining() < n {
                    return None;
                }
                msg.advance(n);
            }
            _ => return None,
        }
    }
    Some(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages() {
        assert_eq!(&request_message("")[..], b"\0\0\0\0\0");
        assert_eq!(&request_message("a.B")[..], b"\0\0\0\0\x05\x0a\x03a.B");
        assert_eq!(
            serving_status(Bytes::from_static(b"\0\0\0\0\x02\x08\x01")),
            Some(1)
        );
        assert_eq!(
            serving_status(Bytes::from_static(b"\0\0\0\0\x02\x08\x02")),
            Some(2)
        );
        assert_eq!(serving_status(Bytes::from_static(b"\0\0\0\0\0")), Some(0));
        // An unknown field first, then the status.
        assert_eq!(
            serving_status(Bytes::from_static(b"\0\0\0\0\x05\x12\x01z\x08\x01")),
            Some(1)
        );
        assert_eq!(
            serving_status(Bytes::from_static(b"\0\0\0\0\x09\x08")),
            None
        );
        assert_eq!(
            serving_status(Bytes::from_static(b"\x01\0\0\0\x02\x08\x01")),
            None
        );
    }
}
