//! The document against the router: a real coordinator answers a method no route has (`PATCH`)
//! with `405` and the methods the route does have, which must be the document's.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};

use utoipa::OpenApi;

use super::ApiDoc;
use crate::{Config, Limits, Timing, Tls};

pub(crate) fn coordinator() -> (tempfile::TempDir, crate::Running) {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        data_dir: dir.path().join("data"),
        listen: "127.0.0.1:0".parse().unwrap(),
        timing: Timing::default(),
        limits: Limits::default(),
        tls: Tls::InsecureHttp,
        max_blob_bytes: 1 << 20,
        usage_half_life_ms: 3_600_000,
        store_url: None,
        advertise_url: None,
    };
    let running = crate::start(config, false).unwrap();
    (dir, running)
}

/// One HTTP/1.1 exchange: the status and the headers (names in lower case) and the body.
fn call(addr: std::net::SocketAddr, method: &str, path: &str) -> (u16, BTreeMap<String, String>, String) {
    call_as(addr, "", method, path)
}

/// The same, with `Authorization: Bearer <token>` unless the token is empty.
fn call_as(
    addr: std::net::SocketAddr,
    token: &str,
    method: &str,
    path: &str,
) -> (u16, BTreeMap<String, String>, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let auth = if token.is_empty() { String::new() } else { format!("Authorization: Bearer {token}\r\n") };
    write!(s, "{method} {path} HTTP/1.1\r\nHost: vmgrid\r\n{auth}Connection: close\r\nContent-Length: 0\r\n\r\n")
        .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let mut lines = head.lines();
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers, body.to_string())
}

/// The document's paths, each with its methods in upper case.
fn documented() -> BTreeMap<String, BTreeSet<String>> {
    let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
    let paths = doc["paths"].as_object().unwrap();
    paths
        .iter()
        .map(|(p, ops)| (p.clone(), ops.as_object().unwrap().keys().map(|m| m.to_uppercase()).collect()))
        .collect()
}

#[test]
fn every_route_is_documented_with_its_methods_and_every_documented_path_is_served() {
    let doc = documented();
    let routes: BTreeSet<String> = super::super::routes().into_iter().map(|(p, _)| p.to_string()).collect();
    let doc_paths: BTreeSet<String> = doc.keys().cloned().collect();
    assert_eq!(routes, doc_paths, "the router's paths and the document's differ");

    let (_dir, running) = coordinator();
    for (path, methods) in &doc {
        let concrete = path.replace("{id}", "1").replace("{hash}", &"0".repeat(64));
        let (status, headers, _) = call(running.addr, "PATCH", &concrete);
        assert_eq!(status, 405, "PATCH {concrete}: no route takes PATCH, so its answer names the methods");
        let allowed: BTreeSet<String> =
            headers.get("allow").unwrap().split(',').map(|m| m.trim().to_string()).filter(|m| !m.is_empty()).collect();
        // axum answers HEAD wherever there is GET; the document lists HEAD only where it is its own call.
        let mut expected = methods.clone();
        if expected.contains("GET") {
            expected.insert("HEAD".into());
        }
        assert_eq!(allowed, expected, "{path}: the router's methods and the document's differ");
    }
    running.stop();
}

#[test]
fn the_document_is_served_without_a_token_and_is_openapi_3_1() {
    let (_dir, running) = coordinator();
    let (status, headers, body) = call(running.addr, "GET", "/openapi.json");
    assert_eq!(status, 200);
    assert_eq!(headers.get("content-type").map(String::as_str), Some("application/json"));
    let served: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(served, serde_json::to_value(ApiDoc::openapi()).unwrap());
    assert_eq!(served["openapi"], "3.1.0");
    assert_eq!(served["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
    // Every response with a schema reference names a schema the document has.
    let schemas = served["components"]["schemas"].as_object().unwrap();
    let text = body.replace("\\/", "/");
    for r in text.split("\"#/components/schemas/").skip(1) {
        let name = &r[..r.find('"').unwrap()];
        assert!(schemas.contains_key(name), "{name} is referenced but not in the document");
    }
    running.stop();
}

#[test]
fn bad_path_and_query_parameters_and_wrong_methods_get_the_documented_json_error() {
    let (dir, running) = coordinator();
    let token = std::fs::read_to_string(dir.path().join("data/admin.token")).unwrap();
    let cases = [
        ("GET", "/v1/jobs/abc", 400, "bad path"),
        ("GET", "/v1/jobs/18446744073709551616/wait", 400, "bad path"),
        ("GET", "/v1/jobs?limit=abc", 400, "bad query string"),
        ("GET", "/v1/jobs?state=sleeping", 400, "unknown state"),
        ("GET", "/v1/jobs/1/wait?timeout_ms=-1", 400, "bad query string"),
        ("GET", "/v1/dags/x", 400, "bad path"),
        ("PATCH", "/v1/jobs", 405, "does not take that method"),
        ("GET", "/v1/nowhere", 404, "no such API call"),
    ];
    for (method, path, status, says) in cases {
        let (got, headers, body) = call_as(running.addr, token.trim(), method, path);
        assert_eq!(got, status, "{method} {path}: {body}");
        assert_eq!(headers.get("content-type").map(String::as_str), Some("application/json"), "{method} {path}");
        let err: vmgrid_proto::ApiError = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"));
        assert!(err.error.contains(says), "{method} {path}: {}", err.error);
    }
    running.stop();
}

/// A part of an `allOf` that refused properties it does not list would refuse the other parts'
/// (no node list could match `NodeView` so); and a real `NodeView`'s fields are each described.
#[test]
fn no_part_of_an_all_of_refuses_the_other_parts_fields() {
    let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    let parts = |name: &str| -> Vec<serde_json::Value> {
        let all = schemas[name]["allOf"].as_array().cloned().unwrap_or_default();
        all.into_iter()
            .map(|p| match p["$ref"].as_str() {
                Some(r) => schemas[r.trim_start_matches("#/components/schemas/")].clone(),
                None => p,
            })
            .collect()
    };
    for name in schemas.keys() {
        for part in parts(name) {
            assert_ne!(part.get("additionalProperties"), Some(&serde_json::json!(false)), "{name}: {part}");
        }
    }
    let ad = vmgrid_proto::NodeAd {
        name: "n1".into(),
        arch: "x86_64".into(),
        os: "linux".into(),
        cpus: 2,
        memory_mb: 1024,
        disk_mb: 1024,
        vm_types: vec![vmgrid_proto::VmType::Wasm],
        accelerators: vec!["tcg".into()],
        labels: BTreeMap::from([("rack".to_string(), "a".to_string())]),
        appliance: false,
        qemu: Some("10.0.2".into()),
        peer: None,
        overlay: None,
    };
    let view = vmgrid_proto::NodeView {
        ad,
        state: vmgrid_proto::NodeState::Ready,
        running_jobs: 0,
        free_cpus: 2,
        free_memory_mb: 1024,
        last_seen_ms: 1,
        cache: None,
        reputation: 0.5,
        agreements: 0,
        disagreements: 0,
    };
    let described: BTreeSet<String> =
        parts("NodeView").iter().flat_map(|p| p["properties"].as_object().unwrap().keys().cloned()).collect();
    let sent = serde_json::to_value(&view).unwrap();
    for field in sent.as_object().unwrap().keys() {
        assert!(described.contains(field), "NodeView's {field} is not in the document");
    }
}

/// One request acts on at most `MAX_ACTION_IDS` jobs (the engine's lock is held meanwhile); the
/// document says so, and more is a 400 that says how many.
#[test]
fn an_action_on_more_jobs_than_a_request_may_name_is_refused() {
    let (dir, running) = coordinator();
    let token = std::fs::read_to_string(dir.path().join("data/admin.token")).unwrap();
    let post = |n: usize| {
        let body = serde_json::json!({ "action": "rm", "ids": (1..=n as u64).collect::<Vec<_>>() }).to_string();
        let mut s = std::net::TcpStream::connect(running.addr).unwrap();
        write!(
            s,
            "POST /v1/jobs/actions HTTP/1.1\r\nHost: vmgrid\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
            token.trim(),
            body.len()
        )
        .unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).unwrap();
        raw
    };
    let ok = post(vmgrid_proto::MAX_ACTION_IDS);
    assert!(ok.starts_with("HTTP/1.1 200") && ok.contains("no such job"), "{}", &ok[..200.min(ok.len())]);
    let refused = post(vmgrid_proto::MAX_ACTION_IDS + 1);
    assert!(refused.starts_with("HTTP/1.1 400"), "{refused}");
    assert!(refused.contains("at most 10000 job ids a request; this one has 10001"), "{refused}");
    let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
    assert_eq!(doc["components"]["schemas"]["ActionRequest"]["properties"]["ids"]["maxItems"], 10000);
    running.stop();
}

/// The blob calls' example hash is the hash of the example blob that scripts/schemathesis stores.
#[test]
fn the_example_blob_hash_is_the_example_blobs() {
    let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
    let params = &doc["paths"]["/v1/blobs/{hash}"]["get"]["parameters"];
    let hash = params.as_array().unwrap().iter().find(|p| p["name"] == "hash").unwrap()["example"].clone();
    assert_eq!(hash, blake3::hash(super::EXAMPLE_BLOB.as_bytes()).to_hex().as_str());
}
