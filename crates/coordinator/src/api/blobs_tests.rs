//! Byte ranges of blobs: the parser, and a real coordinator answering them.

use std::io::{Read, Write};
use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, header};

use super::range;
use crate::api::openapi::tests::coordinator;

fn asked(spec: &str, len: u64) -> Result<Option<(u64, u64)>, ()> {
    let mut h = HeaderMap::new();
    h.insert(header::RANGE, HeaderValue::from_str(spec).unwrap());
    range(&h, len)
}

#[test]
fn a_range_header_names_one_span_of_the_blob_or_is_refused() {
    assert_eq!(range(&HeaderMap::new(), 10), Ok(None));
    assert_eq!(asked("bytes=0-3", 10), Ok(Some((0, 3))));
    assert_eq!(asked("bytes=4-", 10), Ok(Some((4, 9))), "from a byte to the end: a resumed download");
    assert_eq!(asked("bytes=-3", 10), Ok(Some((7, 9))), "the last bytes: an output's tail");
    assert_eq!(asked("bytes=-30", 10), Ok(Some((0, 9))), "a tail longer than the blob is all of it");
    assert_eq!(asked("bytes=5-100", 10), Ok(Some((5, 9))), "the end is cut to the blob's");
    assert_eq!(asked("bytes=10-", 10), Err(()), "starts past the end");
    assert_eq!(asked("bytes=-0", 10), Err(()), "the last 0 bytes");
    assert_eq!(asked("Bytes=0-1", 10), Ok(Some((0, 1))), "the unit in any case");
    assert_eq!(asked("bytes=-5", 0), Ok(None), "a tail of an empty blob: all of it, nothing");
    // Malformed or invalid ranges are ignored: the whole blob.
    for spec in ["bytes=5-4", "bytes=x-", "bytes=-", "bytes=+1-2", "bytes=1-+2", "bytes=0-1,4-5", "bytes"] {
        assert_eq!(asked(spec, 10), Ok(None), "{spec}");
    }
    assert_eq!(asked("pages=1-2", 10), Ok(None), "another unit: the whole blob");
}

/// One exchange with a body; the status line's code, the headers (lower case) and the body bytes.
fn exchange(addr: std::net::SocketAddr, head: &str, body: &[u8]) -> (u16, String, Vec<u8>) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "{head}Host: vmgrid\r\nConnection: close\r\nContent-Length: {}\r\n\r\n", body.len()).unwrap();
    s.write_all(body).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head, raw[split + 4..].to_vec())
}

#[test]
fn a_blob_is_served_whole_or_by_range() {
    let (dir, running) = coordinator();
    let token = std::fs::read_to_string(dir.path().join("data/admin.token")).unwrap();
    let auth = format!("Authorization: Bearer {}\r\n", token.trim());
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let hash = blake3::hash(&data).to_hex().to_string();
    let (status, _, _) = exchange(running.addr, &format!("PUT /v1/blobs/{hash} HTTP/1.1\r\n{auth}"), &data);
    assert_eq!(status, 201);

    let (status, head, _) = exchange(running.addr, &format!("HEAD /v1/blobs/{hash} HTTP/1.1\r\n{auth}"), b"");
    assert_eq!(status, 200);
    assert!(head.contains("content-length: 100000") && head.contains("accept-ranges: bytes"), "HEAD: {head}");

    let get = |range: &str| exchange(running.addr, &format!("GET /v1/blobs/{hash} HTTP/1.1\r\n{auth}{range}"), b"");
    let (status, head, body) = get("");
    assert_eq!((status, body.len()), (200, data.len()));
    assert!(head.contains("accept-ranges: bytes"), "{head}");
    let (status, head, body) = get("Range: bytes=-8192\r\n");
    assert_eq!(status, 206);
    assert_eq!(body, &data[data.len() - 8192..]);
    assert!(head.contains("content-range: bytes 91808-99999/100000"), "{head}");
    let (status, _, body) = get("Range: bytes=99990-\r\n");
    assert_eq!((status, body.as_slice()), (206, &data[99_990..]));
    let (status, head, body) = get("Range: bytes=100000-\r\n");
    assert_eq!(status, 416);
    assert!(head.contains("content-range: bytes */100000"), "{head}");
    assert!(String::from_utf8_lossy(&body).contains("outside blob"));
    running.stop();
}
