//! The overlay's calls (`network = "grid"`): a node's hello and map, the relay's two directions
//! (packets as opaque bytes: WireGuard ciphertext), and `vmgrid net`'s view.

use vmgrid_proto::overlay::{NetView, OverlayHello, OverlayMap};

use crate::{Client, ClientError, Result};

impl Client {
    /// Says this node's key, endpoint and paths; the answer is its map.
    pub fn overlay_hello(&self, hello: &OverlayHello) -> Result<OverlayMap> {
        self.post("/v1/overlay", hello)
    }

    /// Sends a relay body (packets for other nodes) through the pool.
    pub fn relay_send(&self, body: &[u8]) -> Result<()> {
        let resp = self.exchange(false, |base| {
            self.agent
                .post(format!("{base}/v1/overlay/relay"))
                .header("Authorization", &self.auth)
                .header("Content-Type", "application/octet-stream")
                .send(body)
        })?;
        self.check(resp).map(|_| ())
    }

    /// The packets the pool relayed to this node, waiting up to `wait_ms` for one.
    pub fn relay_recv(&self, wait_ms: u64) -> Result<Vec<u8>> {
        let resp = self.call_get(&format!("/v1/overlay/relay?wait_ms={wait_ms}"))?;
        let mut resp = self.check(resp)?;
        resp.body_mut()
            .with_config()
            .limit(vmgrid_proto::overlay::MAX_RELAY_BODY as u64 + 4096)
            .read_to_vec()
            .map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// Every node's end of the overlay.
    pub fn net(&self) -> Result<Vec<NetView>> {
        self.get("/v1/net")
    }
}
