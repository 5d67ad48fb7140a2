//! The OpenAPI 3.1 document of the whole API, served at `GET /openapi.json` (no token needed: it
//! describes the calls, never the pool's data). Its schemas are derived from the wire types in
//! `vmgrid-proto` (`utoipa::ToSchema`); the operations are described here, one stub per route of
//! [`super::routes`], and a test checks that both list the same paths and methods.

use std::collections::BTreeMap;

use axum::Json;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{Content, Ref, RefOr, ResponseBuilder, response::Response};
use utoipa::{IntoResponses, Modify, OpenApi};
use vmgrid_proto::*;

use super::events::ChangedEvent;
use super::overview::Overview;

#[derive(OpenApi)]
#[openapi(
    info(title = "vmgrid coordinator API", description = "The HTTP API of a vmgrid pool's coordinator. Every call but the dashboard's files and this document needs `Authorization: Bearer <token>`; errors are JSON `{\"error\": \"...\"}`."),
    paths(
        jobs_submit, jobs_list, jobs_actions, jobs_result, jobs_wait,
        dags_submit, dags_list, dags_get, dags_rm,
        nodes_list, nodes_register, nodes_lease, nodes_heartbeat, nodes_report, nodes_checkpoint, nodes_deregister,
        nodes_ban, overlay_hello, overlay_relay_send, overlay_relay_recv, net_list,
        blobs_get, blobs_head, blobs_put, blobs_peers, blobs_pieces,
        tokens_add, tokens_list, tokens_revoke, consoles_open,
        users_list, users_settings, events_stream, overview_get,
        metrics, openapi_json, dashboard_index, dashboard_script, dashboard_pages, dashboard_style,
    ),
    components(schemas(ApiError, super::jobs::Order)),
    modifiers(&Bearer, &OpenFlattened, &KnownBlobs),
    security(("bearer" = [])),
)]
pub struct ApiDoc;

struct Bearer;

impl Modify for Bearer {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let scheme = HttpBuilder::new()
            .scheme(HttpAuthScheme::Bearer)
            .description(Some("a pool, admin, user, node or console token, as the CLI uses"))
            .build();
        doc.components.get_or_insert_with(Default::default).add_security_scheme("bearer", SecurityScheme::Http(scheme));
    }
}

/// A type that flattens another (`NodeView` its `NodeAd`) is described as `allOf` of the two;
/// but the flattened one refuses unknown fields on its own (`additionalProperties: false`), which
/// no object with the other part's fields could satisfy. Inside an `allOf`, such a part is put
/// inline, open.
struct OpenFlattened;

impl Modify for OpenFlattened {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::schema::Schema;
        let Some(components) = doc.components.as_mut() else { return };
        let closed: BTreeMap<String, Schema> = components
            .schemas
            .iter()
            .filter_map(|(name, s)| match s {
                RefOr::T(Schema::Object(o)) if o.additional_properties.is_some() => {
                    let mut open = o.clone();
                    open.additional_properties = None;
                    Some((format!("#/components/schemas/{name}"), Schema::Object(open)))
                }
                _ => None,
            })
            .collect();
        for schema in components.schemas.values_mut() {
            if let RefOr::T(Schema::AllOf(all)) = schema {
                for part in &mut all.items {
                    if let RefOr::Ref(r) = part
                        && let Some(open) = closed.get(&r.ref_location)
                    {
                        *part = RefOr::T(open.clone());
                    }
                }
            }
        }
    }
}

/// An upload of a blob the pool already holds is answered at once, without reading a body: the
/// body of `PUT /v1/blobs/{hash}` is not required.
struct KnownBlobs;

impl Modify for KnownBlobs {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let put = doc.paths.paths.get_mut("/v1/blobs/{hash}").and_then(|p| p.put.as_mut());
        if let Some(body) = put.and_then(|op| op.request_body.as_mut()) {
            body.required = Some(utoipa::openapi::Required::False);
        }
    }
}

/// The blob the document's examples name (by its BLAKE3 hash, in each blob call's `hash`
/// parameter): scripts/schemathesis stores it before fuzzing, so the examples find a real blob.
#[cfg(test)]
pub const EXAMPLE_BLOB: &str = "an example blob of the vmgrid API document\n";

/// The errors every authenticated call can answer with, each a JSON [`ApiError`].
const ERRORS: [(&str, &str); 6] = [
    ("400", "bad input: the request, its body or a parameter"),
    ("401", "no token, or one this pool does not know"),
    ("403", "the token's role may not make this call"),
    ("404", "no such job, workflow, token, user or blob"),
    ("409", "the call conflicts with the state of what it names"),
    ("503", "the pool cannot save changes right now, or this coordinator is a standby"),
];
/// Blob calls can also fail on the coordinator's side, or for the size of an upload.
const BLOB_ERRORS: [(&str, &str); 3] = [
    ("413", "the upload is larger than one blob may be"),
    ("500", "the coordinator could not read or store the blob"),
    ("507", "the coordinator's disk, or the caller's blob quota, is full"),
];

fn error((code, description): &(&str, &str)) -> (String, RefOr<Response>) {
    let body = Content::new(Some(Ref::from_schema_name("ApiError")));
    (
        code.to_string(),
        ResponseBuilder::new().description(*description).content("application/json", body).build().into(),
    )
}

/// A HEAD answer has no body: its errors are the status and the sentence in `x-vmgrid-error`.
fn bare_error((code, description): &(&str, &str)) -> (String, RefOr<Response>) {
    let header = utoipa::openapi::HeaderBuilder::new()
        .schema(utoipa::openapi::ObjectBuilder::new().schema_type(utoipa::openapi::schema::Type::String))
        .description(Some("why, as one line of printable ASCII"))
        .build();
    (code.to_string(), ResponseBuilder::new().description(*description).header(ERROR_HEADER, header).build().into())
}

struct Errors;
impl IntoResponses for Errors {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        ERRORS.iter().map(error).collect()
    }
}

struct BlobErrors;
impl IntoResponses for BlobErrors {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        ERRORS.iter().chain(&BLOB_ERRORS).map(error).collect()
    }
}

struct HeadErrors;
impl IntoResponses for HeadErrors {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        ERRORS.iter().chain(&BLOB_ERRORS).map(bare_error).collect()
    }
}

pub async fn serve() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

// One stub per operation: utoipa reads the attributes; the handlers are in the sibling modules.
macro_rules! op {
    ($name:ident, $($attr:tt)*) => {
        #[utoipa::path($($attr)*)]
        #[allow(dead_code)]
        fn $name() {}
    };
}

op!(
    jobs_submit,
    post,
    path = "/v1/jobs",
    tag = "jobs",
    request_body = SubmitRequest,
    responses((status = 200, description = "the jobs queued", body = SubmitResponse), Errors)
);
op!(jobs_list, get, path = "/v1/jobs", tag = "jobs",
    params(("after" = Option<u64>, Query, description = "where the previous page ended (its `next_after`): only jobs past this id in the list's order; 0 or none: from the start"),
           ("order" = Option<super::jobs::Order>, Query, description = "`oldest` (the default: by id, smallest first) or `newest` (largest id first)"),
           ("limit" = Option<u64>, Query, description = "at most this many: 1 to 10,000 (default 1000; 0 is taken as 1, more than 10,000 as 10,000)"),
           ("state" = Option<String>, Query, description = "only jobs in this state (idle, running, held, completed, removed)"),
           ("owner" = Option<String>, Query, description = "only this owner's jobs (at most 256 characters)"),
           ("name" = Option<String>, Query, description = "only jobs whose name contains this, case folded (at most 256 characters)")),
    responses((status = 200, description = "one page of the jobs the caller may see (it looks at 100,000 jobs at most: a filtered page may be short, even empty, and still have a `next_after`)", body = JobPage), Errors));
op!(
    jobs_actions,
    post,
    path = "/v1/jobs/actions",
    tag = "jobs",
    request_body = ActionRequest,
    responses((status = 200, description = "what the action did to each job", body = ActionResponse), Errors)
);
op!(
    jobs_result,
    get,
    path = "/v1/jobs/{id}",
    tag = "jobs",
    params(("id" = u64, Path, description = "the job's id", example = 1)),
    responses((status = 200, description = "the job, its attempts and its outputs", body = JobResult), Errors)
);
op!(jobs_wait, get, path = "/v1/jobs/{id}/wait", tag = "jobs",
    params(("id" = u64, Path, description = "the job's id", example = 1),
           ("timeout_ms" = Option<u64>, Query, description = "answer after this long at the latest (at most 600000)")),
    responses((status = 200, description = "the job once completed, removed or held, or at the timeout", body = JobView), Errors));
op!(
    dags_submit,
    post,
    path = "/v1/dags",
    tag = "dags",
    request_body = DagSubmitRequest,
    responses((status = 200, description = "the workflow submitted", body = DagView), Errors)
);
op!(dags_list, get, path = "/v1/dags", tag = "dags",
    responses((status = 200, description = "the workflows the caller may see", body = Vec<DagSummary>), Errors));
op!(
    dags_get,
    get,
    path = "/v1/dags/{id}",
    tag = "dags",
    params(("id" = u64, Path, description = "the workflow's id", example = 1)),
    responses((status = 200, description = "the workflow", body = DagView), Errors)
);
op!(
    dags_rm,
    post,
    path = "/v1/dags/{id}/rm",
    tag = "dags",
    params(("id" = u64, Path, description = "the workflow's id", example = 1)),
    responses((status = 200, description = "the workflow, its jobs removed", body = DagView), Errors)
);
op!(nodes_list, get, path = "/v1/nodes", tag = "nodes",
    responses((status = 200, description = "every node", body = Vec<NodeView>), Errors));
op!(
    nodes_register,
    post,
    path = "/v1/nodes/register",
    tag = "nodes",
    request_body = RegisterRequest,
    responses((status = 200, description = "the node's own token (pool token only)", body = RegisterResponse), Errors)
);
op!(
    nodes_lease,
    post,
    path = "/v1/nodes/lease",
    tag = "nodes",
    request_body = LeaseRequest,
    responses((status = 200, description = "jobs for the node (node token only)", body = LeaseResponse), Errors)
);
op!(
    nodes_heartbeat,
    post,
    path = "/v1/nodes/heartbeat",
    tag = "nodes",
    request_body = HeartbeatRequest,
    responses((status = 200, description = "the node is alive (node token only)", body = HeartbeatResponse), Errors)
);
op!(
    nodes_report,
    post,
    path = "/v1/nodes/report",
    tag = "nodes",
    request_body = ReportRequest,
    responses(
        (status = 200, description = "an attempt's end recorded (node token only)", body = ReportResponse),
        Errors
    )
);
op!(
    nodes_checkpoint,
    post,
    path = "/v1/nodes/checkpoint",
    tag = "nodes",
    request_body = CheckpointRequest,
    responses(
        (
            status = 204,
            description =
                "the job's latest checkpoint recorded, durably (node token only; every part must be uploaded first)"
        ),
        Errors
    )
);
op!(
    nodes_ban,
    post,
    path = "/v1/nodes/ban",
    tag = "nodes",
    request_body = BanRequest,
    responses(
        (
            status = 204,
            description = "the node is banned (it leaves the pool at once and cannot register again under its name), or its ban lifted (admin only)"
        ),
        Errors
    )
);
op!(
    overlay_hello,
    post,
    path = "/v1/overlay",
    tag = "overlay",
    request_body = vmgrid_proto::overlay::OverlayHello,
    responses(
        (
            status = 200,
            description = "the node's WireGuard key, observed endpoint and paths recorded; the answer is the groups of its running grid jobs and the keys and endpoints of the nodes that run their other members, and, for a node on the overlay itself, its address and the other such nodes (node credentials only; 409 when `key` is not the key the node registered with)",
            body = vmgrid_proto::overlay::OverlayMap
        ),
        Errors
    )
);
op!(
    overlay_relay_send,
    post,
    path = "/v1/overlay/relay",
    tag = "overlay",
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "WireGuard packets for other nodes: each a byte of name length, the node's name, two bytes (big-endian) of packet length and the packet"),
    responses((status = 204, description = "queued for the nodes named, those that run members of a group with the caller's jobs (node credentials only)"), Errors)
);
op!(
    overlay_relay_recv,
    get,
    path = "/v1/overlay/relay",
    tag = "overlay",
    params(("wait_ms" = Option<u64>, Query, description = "wait up to this long (at most 30 s) for a packet")),
    responses((status = 200, description = "the WireGuard packets relayed to the calling node, each with the name of the node it came from; empty when none came (node credentials only)", content_type = "application/octet-stream", body = Vec<u8>), Errors)
);
op!(
    net_list,
    get,
    path = "/v1/net",
    tag = "overlay",
    responses((status = 200, description = "each node's end of the overlay: key, observed endpoint, and the path (direct or relay) to each node it has a tunnel with", body = Vec<vmgrid_proto::overlay::NetView>), Errors)
);
op!(
    nodes_deregister,
    post,
    path = "/v1/nodes/deregister",
    tag = "nodes",
    responses((status = 204, description = "the node left the pool (node token only)"), Errors)
);
op!(
    blobs_peers,
    get,
    path = "/v1/blobs/{hash}/peers",
    tag = "blobs",
    params((
        "hash" = String,
        Path,
        description = "the blob's BLAKE3 hash, 64 hex digits",
        example = "11b23894befa4fcf6ae7dc5012358b6550062d75dc2936d401f3ac4c6bb07887"
    )),
    responses(
        (
            status = 200,
            description = "the ready nodes that share the blob, whole or in part, and where they serve its pieces (node credentials only)",
            body = PeersResponse
        ),
        Errors
    )
);
op!(
    blobs_pieces,
    get,
    path = "/v1/blobs/{hash}/pieces",
    tag = "blobs",
    params((
        "hash" = String,
        Path,
        description = "the blob's BLAKE3 hash, 64 hex digits",
        example = "11b23894befa4fcf6ae7dc5012358b6550062d75dc2936d401f3ac4c6bb07887"
    )),
    responses(
        (
            status = 200,
            description = "the blob's 4 MiB pieces and the BLAKE3 hash of each, to check pieces fetched from other nodes (node credentials only)",
            body = Pieces
        ),
        (status = 404, description = "no such blob", body = ApiError),
        Errors
    )
);
op!(blobs_get, get, path = "/v1/blobs/{hash}", tag = "blobs",
    params(("hash" = String, Path, description = "the blob's BLAKE3 hash, 64 hex digits", example = "11b23894befa4fcf6ae7dc5012358b6550062d75dc2936d401f3ac4c6bb07887"),
           ("Range" = Option<String>, Header, description = "one byte range: `bytes=A-B`, `bytes=A-` (to resume) or `bytes=-N` (the last N bytes); other forms get the whole blob")),
    responses((status = 200, description = "the blob's bytes", content_type = "application/octet-stream", body = Vec<u8>),
              (status = 206, description = "the range asked for, named in `Content-Range`", content_type = "application/octet-stream", body = Vec<u8>),
              (status = 416, description = "no byte of the range is in the blob; `Content-Range: bytes */LEN` says its size", body = ApiError),
              BlobErrors));
op!(blobs_head, head, path = "/v1/blobs/{hash}", tag = "blobs",
    params(("hash" = String, Path, description = "the blob's BLAKE3 hash, 64 hex digits", example = "11b23894befa4fcf6ae7dc5012358b6550062d75dc2936d401f3ac4c6bb07887"),
           ("size" = Option<u64>, Query, description = "the size of an upload the caller means to make: the answer is the refusal it would get")),
    responses((status = 200, description = "the pool has the blob"), HeadErrors));
op!(blobs_put, put, path = "/v1/blobs/{hash}", tag = "blobs", params(("hash" = String, Path, description = "the blob's BLAKE3 hash, 64 hex digits", example = "11b23894befa4fcf6ae7dc5012358b6550062d75dc2936d401f3ac4c6bb07887")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "the blob's bytes; may be left out when the pool has the blob already (it answers 200 at once)"),
    responses((status = 200, description = "the pool had the blob already"), (status = 201, description = "the blob stored"), BlobErrors));
op!(
    tokens_add,
    post,
    path = "/v1/tokens",
    tag = "tokens",
    request_body = TokenRequest,
    responses((status = 200, description = "the new token (admin only)", body = TokenResponse), Errors)
);
op!(tokens_list, get, path = "/v1/tokens", tag = "tokens",
    responses((status = 200, description = "every token, without its secret (admin only)", body = Vec<TokenView>), Errors));
op!(
    tokens_revoke,
    post,
    path = "/v1/tokens/revoke",
    tag = "tokens",
    request_body = RevokeRequest,
    responses((status = 204, description = "the token revoked (admin only)"), Errors)
);
op!(
    consoles_open,
    post,
    path = "/v1/consoles",
    tag = "tokens",
    request_body = ConsoleRequest,
    responses((status = 200, description = "a console token for the caller's job", body = ConsoleResponse), Errors)
);
op!(users_list, get, path = "/v1/users", tag = "users",
    responses((status = 200, description = "every user (admin), or the caller", body = Vec<UserView>), Errors));
op!(
    users_settings,
    post,
    path = "/v1/users/settings",
    tag = "users",
    request_body = UserSettingsRequest,
    responses((status = 200, description = "the user's settings changed (admin only)", body = UserView), Errors)
);
op!(
    events_stream,
    get,
    path = "/v1/events",
    tag = "pool",
    responses(
        (
            status = 200,
            description = "a server-sent event stream: an event `changed` (data: `{\"seq\":N}`, the pool's change count) at once and then once a change is durable, coalesced to one each 300 ms, and a keep-alive comment every 15 s; no job's data: the page asks the other calls. The stream ends when its token is revoked or expires",
            content_type = "text/event-stream",
            body = ChangedEvent
        ),
        (status = 429, description = "the caller's owner has 8 streams open, the most one owner may", body = ApiError),
        Errors
    )
);
op!(
    overview_get,
    get,
    path = "/v1/overview",
    tag = "pool",
    responses(
        (
            status = 200,
            description = "the pool's totals and the last hour's throughput and queue length",
            body = Overview
        ),
        Errors
    )
);
op!(
    metrics,
    get,
    path = "/metrics",
    tag = "pool",
    responses((status = 200, description = "Prometheus metrics", content_type = "text/plain", body = String), Errors)
);
op!(
    openapi_json,
    get,
    path = "/openapi.json",
    tag = "pool",
    security(()),
    responses((status = 200, description = "this document", content_type = "application/json", body = Object))
);
op!(
    dashboard_index,
    get,
    path = "/",
    tag = "dashboard",
    security(()),
    responses((status = 200, description = "the dashboard's page", content_type = "text/html", body = String))
);
op!(
    dashboard_script,
    get,
    path = "/dashboard/app.js",
    tag = "dashboard",
    security(()),
    responses((status = 200, description = "the dashboard's script", content_type = "text/javascript", body = String))
);
op!(
    dashboard_pages,
    get,
    path = "/dashboard/app-pages.js",
    tag = "dashboard",
    security(()),
    responses((
        status = 200,
        description = "the dashboard's page views",
        content_type = "text/javascript",
        body = String
    ))
);
op!(
    dashboard_style,
    get,
    path = "/dashboard/app.css",
    tag = "dashboard",
    security(()),
    responses((status = 200, description = "the dashboard's style sheet", content_type = "text/css", body = String))
);

#[cfg(test)]
#[path = "openapi_tests.rs"]
pub(crate) mod tests;
