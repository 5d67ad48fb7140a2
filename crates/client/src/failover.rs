//! One pool reached at several coordinators' URLs (`--pool URL1,URL2`: an active coordinator and
//! its standbys on a shared PostgreSQL store). A call goes to the coordinator that answered last;
//! when that one is a standby (`503` with `x-vmgrid-standby`) or cannot be reached, it goes to the
//! next, round after round, for up to [`FAILOVER_WINDOW`] — but a call that is not safe to repeat
//! moves on only if it never reached a server, so nothing is done twice.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// How long a call keeps looking for the active coordinator among several.
pub const FAILOVER_WINDOW: Duration = Duration::from_secs(30);
/// The pause after every coordinator was tried once.
pub(crate) const ROUND_PAUSE: Duration = Duration::from_millis(250);

#[derive(Debug)]
pub(crate) struct Coordinators {
    urls: Vec<String>,
    at: AtomicUsize,
}

impl Coordinators {
    /// `URL` or `URL1,URL2,…`; a trailing `/` is dropped.
    pub fn parse(spec: &str) -> Coordinators {
        let mut urls: Vec<String> =
            spec.split(',').map(|u| u.trim().trim_end_matches('/').to_string()).filter(|u| !u.is_empty()).collect();
        if urls.is_empty() {
            urls.push(spec.trim().to_string());
        }
        Coordinators { urls, at: AtomicUsize::new(0) }
    }

    pub fn len(&self) -> usize {
        self.urls.len()
    }

    /// The index and URL of the coordinator a call goes to now.
    pub fn current(&self) -> (usize, &str) {
        let i = self.at.load(Ordering::Relaxed) % self.urls.len();
        (i, &self.urls[i])
    }

    /// Moves on from coordinator `i` (unless another call already did).
    pub fn next_after(&self, i: usize) {
        let _ = self.at.compare_exchange(i, (i + 1) % self.urls.len(), Ordering::Relaxed, Ordering::Relaxed);
    }

    /// The URLs as given, comma-separated.
    pub fn spec(&self) -> String {
        self.urls.join(",")
    }
}

/// Whether a call failed before it reached any server (connection refused, no such host, the
/// connection or TLS handshake failed): sending it elsewhere cannot do it twice. "Host
/// unreachable" is not among them: Linux also reports it for a connection that was established
/// (and may have carried the call) when it times out after an ICMP error. Refused is only ever
/// the answer to a connection attempt.
pub(crate) fn never_sent(e: &ureq::Error) -> bool {
    match e {
        ureq::Error::ConnectionFailed | ureq::Error::HostNotFound | ureq::Error::Tls(_) => true,
        ureq::Error::Timeout(t) => matches!(t, ureq::Timeout::Connect | ureq::Timeout::Resolve),
        ureq::Error::Io(io) => io.kind() == std::io::ErrorKind::ConnectionRefused,
        _ => false,
    }
}

/// Whether an answer is a standby coordinator's.
pub(crate) fn is_standby<B>(resp: &ureq::http::Response<B>) -> bool {
    resp.status().as_u16() == 503 && resp.headers().contains_key(vmgrid_proto::STANDBY_HEADER)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_split_trimmed_and_rotated() {
        let c = Coordinators::parse(" https://a:1/, https://b:2 ,");
        assert_eq!(c.spec(), "https://a:1,https://b:2");
        assert_eq!(c.current(), (0, "https://a:1"));
        c.next_after(0);
        assert_eq!(c.current(), (1, "https://b:2"));
        c.next_after(0);
        assert_eq!(c.current().0, 1, "a stale move on is ignored");
        c.next_after(1);
        assert_eq!(c.current(), (0, "https://a:1"));
        assert_eq!(Coordinators::parse("http://one").len(), 1);
    }

    #[test]
    fn only_errors_before_sending_count_as_never_sent() {
        let refused = ureq::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(never_sent(&refused));
        assert!(never_sent(&ureq::Error::ConnectionFailed));
        assert!(!never_sent(&ureq::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset))));
        assert!(!never_sent(&ureq::Error::Timeout(ureq::Timeout::RecvResponse)));
        assert!(!never_sent(&ureq::Error::Io(std::io::Error::from(std::io::ErrorKind::HostUnreachable))));
    }
}
