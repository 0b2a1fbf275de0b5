//! Upstream circuit breakers (`[upstream.limits]`), the retry budget and
//! endpoints given by DNS name, against real backends on 127.0.0.1 and a
//! small DNS server on 127.0.0.1 that the test controls.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Response, StatusCode};

use crate::common::backend::{echo_response, full};
use crate::common::{client, free_port, within, Backend, Cfg, Proxy};

fn config(upstream: &str, extra: &str) -> String {
    Cfg::new()
        .admin()
        .route(None, "/", "app")
        .extra(&format!("[[upstream]]\nname = \"app\"\n{upstream}"))
        .extra(extra)
        .toml()
}

async fn upstreams(p: &Proxy) -> serde_json::Value {
    let r = within(10, "/upstreams", p.admin_get("/upstreams")).await;
    serde_json::from_str(&r.text()).unwrap()
}

/// `n` GETs at once, each on its own connection: (status, backend, took).
async fn burst(p: &Proxy, n: usize) -> Vec<(u16, String, Duration)> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let addr = p.addr();
            tokio::spawn(async move {
                let t = Instant::now();
                let r = client::request(addr, Method::GET, "/", &[], Bytes::new()).await;
                let backend = r.header("x-backend").unwrap_or_default();
                (r.status.as_u16(), backend, t.elapsed())
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(within(30, "burst", t).await.unwrap());
    }
    out
}

#[tokio::test]
async fn max_connections_and_a_full_queue_answer_503_at_once() {
    let slow = Backend::slow("slow", Duration::from_millis(600)).await;
    let p = Proxy::start(&config(
        &format!(
            "endpoints = [\"{}\"]\n[upstream.limits]\nmax_connections = 2\nmax_pending = 2\npending_timeout_ms = 5000\n",
            slow.addr()
        ),
        "",
    ));
    let results = burst(&p, 8).await;
    let ok: Vec<_> = results.iter().filter(|r| r.0 == 200).collect();
    let refused: Vec<_> = results.iter().filter(|r| r.0 == 503).collect();
    assert_eq!((ok.len(), refused.len()), (4, 4), "{results:?}");
    // Two were served at once, two waited one turn; the rest never waited.
    assert!(
        refused.iter().all(|r| r.2 < Duration::from_millis(400)),
        "{results:?}"
    );
    assert!(
        ok.iter()
            .filter(|r| r.2 >= Duration::from_millis(1100))
            .count()
            == 2,
        "{results:?}"
    );
    assert_eq!(slow.requests(), 4, "the refused requests never reached it");
    let v = upstreams(&p).await;
    let limits = &v["upstreams"][0]["limits"];
    assert_eq!(limits["refused"], 4, "{v}");
    assert_eq!(limits["in_use"], 0, "{v}");
    let metrics = within(10, "/metrics", p.admin_get("/metrics")).await.text();
    assert!(
        metrics.contains(
            "sluicegate_upstream_overflow_total{upstream=\"app\",reason=\"max_pending\"} 4"
        ),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_request_waits_for_a_slot_at_most_pending_timeout() {
    let slow = Backend::slow("slow", Duration::from_millis(1500)).await;
    let p = Proxy::start(&config(
        &format!(
            "endpoints = [\"{}\"]\n[upstream.limits]\nmax_connections = 1\npending_timeout_ms = 150\n",
            slow.addr()
        ),
        "",
    ));
    let results = burst(&p, 3).await;
    let refused: Vec<_> = results.iter().filter(|r| r.0 == 503).collect();
    assert_eq!(refused.len(), 2, "{results:?}");
    assert!(
        refused
            .iter()
            .all(|r| r.2 >= Duration::from_millis(150) && r.2 < Duration::from_millis(1000)),
        "{results:?}"
    );
    assert_eq!(results.iter().filter(|r| r.0 == 200).count(), 1);
}

/// Answers 503 at once.
async fn busy(id: &str) -> Backend {
    Backend::serve(id, |_req| async {
        let mut r = Response::new(full("busy"));
        *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        r
    })
    .await
}

#[tokio::test]
async fn the_retry_budget_bounds_concurrent_retries() {
    // `bad` fails at once, `good` holds each answer 500 ms: retries of the
    // requests `bad` failed overlap, and the budget allows one at a time.
    let bad = busy("bad").await;
    let good = Backend::slow("good", Duration::from_millis(500)).await;
    let upstream = format!(
        "endpoints = [\"{}\", \"{}\"]\n[upstream.health]\nmax_failures = 0\n",
        bad.addr(),
        good.addr()
    );
    let strict = "[upstream.retry_budget]\npercent = 0.0\nmin_concurrent = 1\n";
    let p = Proxy::start(&config(&upstream, strict));
    let results = burst(&p, 10).await;
    let failed = results.iter().filter(|r| r.0 == 503).count();
    let first_tries_on_bad = bad.requests();
    assert!(first_tries_on_bad >= 4, "{first_tries_on_bad}");
    assert_eq!(
        failed,
        first_tries_on_bad - 1,
        "one retry at a time fitted: {results:?}"
    );
    let v = upstreams(&p).await;
    assert_eq!(v["upstreams"][0]["retry_budget"]["refused"], failed, "{v}");

    // A floor of three lets three through.
    let p = Proxy::start(&config(
        &upstream,
        "[upstream.retry_budget]\nmin_concurrent = 3\n",
    ));
    let results = burst(&p, 10).await;
    let failed = results.iter().filter(|r| r.0 == 503).count();
    let on_bad = bad.requests() - first_tries_on_bad;
    assert!(on_bad >= 4, "{on_bad}");
    assert_eq!(failed, on_bad - 3, "three retries fitted: {results:?}");
}

/// A DNS server on 127.0.0.1 answering `A` queries for one name with the
/// addresses the test sets (anything else: no answers).
struct DnsServer {
    addr: SocketAddr,
    answers: Arc<Mutex<Vec<Ipv4Addr>>>,
    task: tokio::task::JoinHandle<()>,
}

impl DnsServer {
    async fn start(name: &str, answers: Vec<Ipv4Addr>) -> DnsServer {
        let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        let answers = Arc::new(Mutex::new(answers));
        let (shared, name) = (answers.clone(), name.to_ascii_lowercase());
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 512];
            loop {
                let Ok((n, peer)) = sock.recv_from(&mut buf).await else {
                    continue;
                };
                let ips = shared.lock().unwrap().clone();
                if let Some(reply) = dns_reply(&buf[..n], &name, &ips) {
                    let _ = sock.send_to(&reply, peer).await;
                }
            }
        });
        DnsServer {
            addr,
            answers,
            task,
        }
    }

    fn set(&self, ips: Vec<Ipv4Addr>) {
        *self.answers.lock().unwrap() = ips;
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The reply to one query (RFC 1035 §4.1): the header with the query's
/// id, its question, and an `A` record per address when it asks `A` of
/// `name`.
fn dns_reply(query: &[u8], name: &str, ips: &[Ipv4Addr]) -> Option<Vec<u8>> {
    if query.len() < 12 {
        return None;
    }
    let mut i = 12;
    let mut labels = Vec::new();
    while *query.get(i)? != 0 {
        let len = query[i] as usize;
        labels.push(String::from_utf8_lossy(query.get(i + 1..i + 1 + len)?).to_ascii_lowercase());
        i += 1 + len;
    }
    let qtype = u16::from_be_bytes([*query.get(i + 1)?, *query.get(i + 2)?]);
    let question = &query[12..i + 5];
    let answers: &[Ipv4Addr] = if qtype == 1 && labels.join(".") == name {
        ips
    } else {
        &[]
    };
    let mut out = Vec::new();
    out.extend_from_slice(&query[..2]);
    out.extend_from_slice(&[0x81, 0x80, 0, 1]);
    out.extend_from_slice(&(answers.len() as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(question);
    for ip in answers {
        // Name: pointer to the question's; type A, class IN, TTL 1 s, 4 bytes.
        out.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 1, 0, 4]);
        out.extend_from_slice(&ip.octets());
    }
    Some(out)
}

/// An echo backend at `ip:port` whose `/slow` waits 1.5 s.
async fn backend_at(ip: [u8; 4], port: u16, id: &'static str) -> Backend {
    Backend::serve_at(SocketAddr::from((ip, port)), id, move |req| async move {
        if req.uri().path() == "/slow" {
            tokio::time::sleep(Duration::from_millis(1500)).await;
        }
        echo_response(id.into(), req).await
    })
    .await
}

/// Poll `/upstreams` until app's endpoint addresses are `want`.
async fn wait_endpoints(p: &Proxy, want: &[String]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = upstreams(p).await;
        let mut have: Vec<String> = v["upstreams"][0]["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["addr"].as_str().unwrap().to_string())
            .collect();
        have.sort();
        if have == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "endpoints {have:?}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_dns_name_becomes_one_endpoint_per_address_and_follows_changes() {
    let port = free_port();
    let a = backend_at([127, 0, 0, 1], port, "a").await;
    let b = backend_at([127, 0, 0, 2], port, "b").await;
    let c = backend_at([127, 0, 0, 3], port, "c").await;
    let dns = DnsServer::start("app.test", vec![Ipv4Addr::new(127, 0, 0, 1)]).await;
    let p = Proxy::start(&config(
        &format!("endpoints = [\"app.test:{port}\"]\n"),
        &format!(
            "[proxy.dns]\nservers = [\"{}\"]\nrefresh_ms = 200\n",
            dns.addr
        ),
    ));
    let ep = |last: u8| format!("127.0.0.{last}:{port}");
    wait_endpoints(&p, &[ep(1)]).await;
    let v = upstreams(&p).await;
    assert_eq!(
        v["upstreams"][0]["endpoints"][0]["name"],
        format!("app.test:{port}"),
        "{v}"
    );

    // Scale up: every new address takes its share at once.
    dns.set(vec![
        Ipv4Addr::new(127, 0, 0, 1),
        Ipv4Addr::new(127, 0, 0, 2),
        Ipv4Addr::new(127, 0, 0, 3),
    ]);
    let changed = Instant::now();
    wait_endpoints(&p, &[ep(1), ep(2), ep(3)]).await;
    println!("DNS change live after {:?}", changed.elapsed());
    let before = (a.requests(), b.requests(), c.requests());
    for _ in 0..30 {
        let r = within(10, "GET", p.get("/", &[])).await;
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
    }
    assert_eq!(
        (
            a.requests() - before.0,
            b.requests() - before.1,
            c.requests() - before.2
        ),
        (10, 10, 10)
    );

    // Scale down while a request is in flight on each endpoint: they all
    // finish where they started; new requests go to what is left.
    let slow: Vec<_> = (0..3)
        .map(|_| {
            let addr = p.addr();
            tokio::spawn(async move {
                client::request(addr, Method::GET, "/slow", &[], Bytes::new()).await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    dns.set(vec![Ipv4Addr::new(127, 0, 0, 2)]);
    wait_endpoints(&p, &[ep(2)]).await;
    for _ in 0..10 {
        let r = within(10, "GET", p.get("/", &[])).await;
        assert_eq!(r.backend(), "b", "{r:?}");
    }
    let mut finished_on = Vec::new();
    for t in slow {
        let r = within(10, "in-flight request", t).await.unwrap();
        assert_eq!(
            r.status,
            StatusCode::OK,
            "an in-flight request survives: {r:?}"
        );
        finished_on.push(r.backend());
    }
    finished_on.sort();
    assert_eq!(finished_on, ["a", "b", "c"]);
}
