//! The event streams against a real coordinator: a bound per owner, and a stream that ends when
//! its token is revoked. Raw HTTP/1.1 over loopback, every read under a timeout.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use super::MAX_STREAMS_PER_OWNER;
use crate::api::openapi::tests::coordinator;

/// A POST with a JSON body as `token`; the status and the body.
fn post(addr: SocketAddr, token: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: vmgrid\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    (head.split(' ').nth(1).unwrap().parse().unwrap(), body.to_string())
}

/// A new token of `role` for `owner`: its secret and id.
fn token(addr: SocketAddr, admin: &str, role: &str, owner: &str) -> (String, String) {
    token_for(addr, admin, &format!(r#"{{"role":"{role}","owner":"{owner}"}}"#))
}

/// A new token as the JSON request asks: its secret and id.
fn token_for(addr: SocketAddr, admin: &str, request: &str) -> (String, String) {
    let (status, body) = post(addr, admin, "/v1/tokens", request);
    assert_eq!(status, 200, "{body}");
    let t: vmgrid_proto::TokenResponse = serde_json::from_str(&body).unwrap();
    (t.token, t.id)
}

/// Opens `GET /v1/events` as `token`. On 200, waits for the first event (sent at once) and
/// returns the open connection; otherwise the status and what was read.
fn open(addr: SocketAddr, token: &str) -> Result<TcpStream, (u16, String)> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET /v1/events HTTP/1.1\r\nHost: vmgrid\r\nAuthorization: Bearer {token}\r\n\r\n").unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf).expect("the stream answers within 10 s");
        seen.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&seen).to_string();
        if n == 0 || text.contains("event: changed") {
            let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
            return if status == 200 && n > 0 { Ok(s) } else { Err((status, text)) };
        }
        if !text.starts_with("HTTP/1.1 200") && text.contains("\r\n\r\n") && text.ends_with('}') {
            return Err((text.split(' ').nth(1).unwrap().parse().unwrap(), text));
        }
    }
}

/// Reads until the server ends the stream (the chunked body's last chunk, or EOF).
fn ends_within(s: &mut TcpStream, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(n) => {
                seen.extend_from_slice(&buf[..n]);
                if seen.ends_with(b"0\r\n\r\n") {
                    return true;
                }
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => return true,
        }
    }
    false
}

#[test]
fn one_owner_holds_at_most_its_share_of_the_event_streams_and_a_closed_one_is_given_back() {
    let (dir, running) = coordinator();
    let addr = running.addr;
    let admin = std::fs::read_to_string(dir.path().join("data/admin.token")).unwrap();
    let (alice, _) = token(addr, admin.trim(), "user", "alice");
    let (bob, _) = token(addr, admin.trim(), "user", "bob");

    let mut held: Vec<TcpStream> = (0..MAX_STREAMS_PER_OWNER).map(|_| open(addr, &alice).unwrap()).collect();
    let (status, body) = open(addr, &alice).map(|_| ()).unwrap_err();
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("event streams open"), "{body}");
    // Another user is not affected.
    let _bobs = open(addr, &bob).expect("bob opens a stream while alice holds her share");

    // Closing one gives it back once the server sees the close (at the latest, at its next write).
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(20);
    let again = loop {
        // A change makes every stream write, so the server notices a closed connection.
        token(addr, admin.trim(), "user", "carol");
        match open(addr, &alice) {
            Ok(s) => break s,
            Err((429, _)) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
            Err(e) => panic!("alice's closed stream was not given back: {e:?}"),
        }
    };
    drop(again);
    drop(held);
    running.stop();
}

#[test]
fn a_stream_ends_when_its_token_is_revoked() {
    let (dir, running) = coordinator();
    let addr = running.addr;
    let admin = std::fs::read_to_string(dir.path().join("data/admin.token")).unwrap();
    let (alice, id) = token(addr, admin.trim(), "user", "alice");
    let (other, _) = token(addr, admin.trim(), "user", "alice");
    let mut revoked = open(addr, &alice).unwrap();
    let mut kept = open(addr, &other).unwrap();

    let (status, body) = post(addr, admin.trim(), "/v1/tokens/revoke", &format!(r#"{{"id":"{id}"}}"#));
    assert_eq!(status, 204, "{body}");
    assert!(ends_within(&mut revoked, Duration::from_secs(5)), "the revoked token's stream is still open");
    // The same user's other token keeps its stream.
    assert!(!ends_within(&mut kept, Duration::from_secs(1)), "a stream of a valid token ended");
    running.stop();
}

/// An expiry is no change of the pool: the stream sees it at its next check all the same.
#[test]
fn a_stream_ends_when_its_token_expires() {
    let (dir, running) = coordinator();
    let addr = running.addr;
    let admin = std::fs::read_to_string(dir.path().join("data/admin.token")).unwrap();
    let (brief, _) = token_for(addr, admin.trim(), r#"{"role":"user","owner":"alice","ttl_s":1}"#);
    let mut s = open(addr, &brief).unwrap();
    assert!(ends_within(&mut s, Duration::from_secs(10)), "the expired token's stream is still open");
    running.stop();
}

/// The pool's bound: MAX_STREAMS (256) streams in all, whoever holds them; and every open stream ends when the
/// coordinator stops (the stop does not wait for the dashboards to close them).
#[test]
fn the_pool_holds_at_most_max_streams_and_ends_them_all_when_it_stops() {
    let (dir, running) = coordinator();
    let addr = running.addr;
    let admin = std::fs::read_to_string(dir.path().join("data/admin.token")).unwrap();
    let mut held = Vec::new();
    for u in 0..super::MAX_STREAMS / MAX_STREAMS_PER_OWNER {
        let (t, _) = token(addr, admin.trim(), "user", &format!("user{u}"));
        held.extend((0..MAX_STREAMS_PER_OWNER).map(|_| open(addr, &t).unwrap()));
    }
    let (late, _) = token(addr, admin.trim(), "user", "late");
    let (status, body) = open(addr, &late).map(|_| ()).unwrap_err();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("too many event streams"), "{body}");

    let stopped = Instant::now();
    running.stop();
    assert!(stopped.elapsed() < Duration::from_secs(10), "the stop waited {:?}", stopped.elapsed());
    for s in &mut held {
        assert!(ends_within(s, Duration::from_secs(2)), "a stream outlived the coordinator");
    }
}
