//! The disk tier (`[cache.disk]`): entries survive a restart of the proxy
//! and are served from disk (the origin is not asked again), with the
//! proxy's peak resident memory far below what it serves; a file corrupted
//! on disk is never served.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};

use crate::common::backend::full;
use crate::common::client::{build, H1Conn, Resp};
use crate::common::{pattern, within, Backend, Cfg, Proxy, TempDir};

/// The body the origin sends for `/obj/<n>`: `len` bytes, different for
/// each `n` (so that no two share a file: the store is content-addressed).
/// The pattern shifted by `n` bytes-ish: an offset of `n << 36` would give
/// every `n` the same bytes (the pattern reads only low bits of offsets).
fn body_of(n: u64, len: usize) -> Vec<u8> {
    pattern(n * 1_000_003 + 1, len)
}

/// An origin answering `/obj/<n>?len=<bytes>` with [`body_of`], cacheable
/// for an hour.
async fn origin() -> Backend {
    Backend::serve("origin", |req| {
        let path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or("").to_string();
        async move {
            let n: u64 = path.trim_start_matches("/obj/").parse().unwrap_or(0);
            let len: usize = query
                .strip_prefix("len=")
                .and_then(|l| l.parse().ok())
                .unwrap_or(1024);
            let mut r = http::Response::new(full(body_of(n, len)));
            r.headers_mut().insert(
                "cache-control",
                http::HeaderValue::from_static("public, max-age=3600"),
            );
            r.headers_mut().insert(
                "etag",
                http::HeaderValue::from_str(&format!("\"o{n}\"")).unwrap(),
            );
            r
        }
    })
    .await
}

/// A proxy caching everything, memory tier `mem_mb`, disk tier of
/// `disk_mb` in `dir`.
fn proxy(origin: &Backend, dir: &Path, mem_mb: u64, disk_mb: u64) -> Proxy {
    let toml = Cfg::new()
        .admin()
        .upstream("app", &[origin.addr()])
        .extra(&format!(
            "[[route]]\npath_prefix = \"/\"\nupstream = \"app\"\ncache = true\n\n\
             [cache]\nmax_bytes = {}\nmax_object_bytes = {}\n\n\
             [cache.disk]\npath = {:?}\nmax_size_mb = {disk_mb}\nmax_object_mb = 32\n",
            mem_mb << 20,
            (16u64 << 20).min((mem_mb << 20) / 2),
            dir.display().to_string(),
        ))
        .toml();
    Proxy::builder(&toml)
        .start_timeout(Duration::from_secs(60))
        .start()
}

async fn get(p: &Proxy, path: &str) -> Resp {
    within(60, path, p.get(path, &[])).await
}

/// `GET /cache`'s `disk` object.
async fn disk_stats(p: &Proxy) -> serde_json::Value {
    let r = p.admin_get("/cache").await;
    let v: serde_json::Value = serde_json::from_slice(&r.body).expect("GET /cache is JSON");
    v["disk"].clone()
}

/// Wait until the disk tier has written `n` entries.
async fn wait_writes(p: &Proxy, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let d = disk_stats(p).await;
        if d["writes"].as_u64().unwrap_or(0) >= n {
            return;
        }
        assert!(Instant::now() < deadline, "disk writes stuck: {d}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Peak resident set (`VmHWM`) of `pid`, KiB.
fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .expect("VmHWM");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

async fn stop(mut p: Proxy) -> String {
    p.signal("TERM");
    p.wait_exit(Duration::from_secs(20)).await.expect("exits");
    p.output()
}

/// Every file of the store's content.
fn content_files(dir: &Path) -> Vec<PathBuf> {
    fn walk(d: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    walk(&dir.join("content-v2"), &mut out);
    out
}

/// The file holding `bytes`.
fn file_holding(dir: &Path, bytes: &[u8]) -> PathBuf {
    content_files(dir)
        .into_iter()
        .find(|f| std::fs::read(f).is_ok_and(|b| b == bytes))
        .expect("a file with these bytes")
}

/// Flip one byte in the middle of `file`.
fn corrupt(file: &Path) {
    let mut b = std::fs::read(file).unwrap();
    let mid = b.len() / 2;
    b[mid] ^= 0xff;
    std::fs::write(file, b).unwrap();
}

fn assert_body(r: &Resp, n: u64, len: usize) {
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.headers);
    assert_eq!(r.body.len(), len, "/obj/{n}");
    assert!(
        r.body == body_of(n, len),
        "/obj/{n}: not the origin's bytes"
    );
}

/// Three objects on disk; the proxy restarts; one file was corrupted while
/// it was down, and one is corrupted after it was served once. Neither
/// corrupted body is ever delivered whole: the first goes to the origin
/// again, the second's response is cut short, then goes to the origin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_disk_file_is_never_served() {
    let origin = origin().await;
    let dir = TempDir::new("disk-corrupt");
    let store = dir.path().join("store");
    let len = 300_000;
    let p = proxy(&origin, &store, 64, 64);
    for n in 1..=3 {
        assert_body(&get(&p, &format!("/obj/{n}?len={len}")).await, n, len);
    }
    wait_writes(&p, 3).await;
    assert_eq!(origin.requests(), 3);
    stop(p).await;

    // Down: the file of /obj/1 goes bad.
    corrupt(&file_holding(&store, &body_of(1, len)));
    let p = proxy(&origin, &store, 64, 64);
    // /obj/2 is served from disk.
    let r = get(&p, &format!("/obj/2?len={len}")).await;
    assert_body(&r, 2, len);
    assert_eq!(origin.requests(), 3, "/obj/2 came from disk");
    // /obj/1: its check fails before the first hit, so the origin answers.
    let r = get(&p, &format!("/obj/1?len={len}")).await;
    assert_body(&r, 1, len);
    assert_eq!(
        origin.requests(),
        4,
        "the corrupt /obj/1 went to the origin"
    );
    let out = p.wait_output("corrupt disk entry dropped", 10).await;
    assert!(out.contains("corrupt disk entry dropped"));

    // Up: /obj/3 is served (checked), then its file goes bad.
    assert_body(&get(&p, &format!("/obj/3?len={len}")).await, 3, len);
    assert_eq!(origin.requests(), 4);
    corrupt(&file_holding(&store, &body_of(3, len)));
    let path = format!("/obj/3?len={len}");
    let req = build(Method::GET, &path, &[], Bytes::new());
    let outcome = within(30, "corrupt hit", async {
        let mut conn = H1Conn::connect(p.addr()).await;
        match conn.send_streaming(req).await {
            Err(e) => Err(e),
            Ok(resp) => Resp::collect(resp).await,
        }
    })
    .await;
    match outcome {
        Err(_) => {}
        Ok(r) => assert!(
            r.body == body_of(3, len),
            "a complete corrupted body was served ({} bytes)",
            r.body.len()
        ),
    }
    // The entry is gone: the origin answers.
    let r = get(&p, &path).await;
    assert_body(&r, 3, len);
    assert_eq!(
        origin.requests(),
        5,
        "the corrupt /obj/3 went to the origin"
    );
    let d = disk_stats(&p).await;
    assert_eq!(d["corrupt"].as_u64(), Some(2), "{d}");
    stop(p).await;
}

/// The disk tier stays within `max_size_mb`: least recently used first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_disk_tier_stays_within_its_bound() {
    let origin = origin().await;
    let dir = TempDir::new("disk-bound");
    let store = dir.path().join("store");
    let len = 1 << 20;
    // 4 MiB of disk, 8 objects of 1 MiB.
    let p = proxy(&origin, &store, 8, 4);
    for n in 1..=8 {
        assert_body(&get(&p, &format!("/obj/{n}?len={len}")).await, n, len);
        wait_writes(&p, n).await;
    }
    let d = disk_stats(&p).await;
    assert!(d["bytes"].as_u64().unwrap() <= 4 << 20, "{d}");
    assert!(d["evictions"].as_u64().unwrap() >= 4, "{d}");
    stop(p).await;
    let on_disk: u64 = content_files(&store)
        .iter()
        .map(|f| std::fs::metadata(f).unwrap().len())
        .sum();
    assert!(on_disk <= 4 << 20, "{on_disk} bytes of files");
    // After a restart the newest are there, the oldest not.
    let p = proxy(&origin, &store, 8, 4);
    let before = origin.requests();
    assert_body(&get(&p, &format!("/obj/8?len={len}")).await, 8, len);
    assert_eq!(origin.requests(), before, "/obj/8 from disk");
    assert_body(&get(&p, &format!("/obj/1?len={len}")).await, 1, len);
    assert_eq!(origin.requests(), before + 1, "/obj/1 was evicted");
    stop(p).await;
}

/// Issue 25's must-show: memory tier 64 MiB, disk tier 1 GiB, 50 objects
/// of 10 MiB (500 MiB). After a restart every one is served from disk (the
/// origin sees no new request), whole and exact, and the restarted proxy's
/// peak RSS stays far below the set. About a minute: run with `--ignored`
/// (scripts/test.sh runs it with the soak group).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "500 MiB through the proxy twice: scripts/test.sh's ignored group runs it"]
async fn a_500_mib_set_survives_a_restart_and_streams_from_disk() {
    const N: u64 = 50;
    const LEN: usize = 10 << 20;
    let origin = origin().await;
    let dir = TempDir::new("disk-500");
    let store = dir.path().join("store");
    let p = proxy(&origin, &store, 64, 1024);
    let t0 = Instant::now();
    for n in 0..N {
        assert_body(&get(&p, &format!("/obj/{n}?len={LEN}")).await, n, LEN);
    }
    wait_writes(&p, N).await;
    let fill_hwm = vm_hwm_kib(p.pid());
    eprintln!(
        "filled {N} x {LEN} B in {:?}; peak RSS {} MiB",
        t0.elapsed(),
        fill_hwm / 1024
    );
    assert_eq!(origin.requests(), N as usize);
    stop(p).await;

    let p = proxy(&origin, &store, 64, 1024);
    let t1 = Instant::now();
    for n in 0..N {
        assert_body(&get(&p, &format!("/obj/{n}?len={LEN}")).await, n, LEN);
    }
    // A second round: the files are checked already; still from disk.
    for n in (0..N).step_by(5) {
        assert_body(&get(&p, &format!("/obj/{n}?len={LEN}")).await, n, LEN);
    }
    let hwm = vm_hwm_kib(p.pid());
    let d = disk_stats(&p).await;
    eprintln!(
        "served {} x {LEN} B from disk in {:?}; peak RSS {} MiB; {d}",
        N + N / 5,
        t1.elapsed(),
        hwm / 1024
    );
    assert_eq!(origin.requests(), N as usize, "every hit came from disk");
    assert!(d["hits"].as_u64().unwrap() >= N + N / 5, "{d}");
    assert_eq!(d["corrupt"].as_u64(), Some(0), "{d}");
    // 500 MiB served; the memory tier is 64 MiB and disk hits do not fill it.
    assert!(
        hwm < 160 * 1024,
        "peak RSS {} MiB serving 500 MiB from disk",
        hwm / 1024
    );
    stop(p).await;
}
