//! Bounded capture of a guest's stdout or stderr: the first `cap` bytes are kept (and optionally
//! echoed), the rest is counted and dropped, so a guest that floods its output cannot grow our
//! memory. Nothing here blocks the guest: a full capture still accepts and discards writes.

use std::io::Write;
use std::sync::{Arc, Mutex};

/// What was captured of one stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Captured {
    pub bytes: Vec<u8>,
    /// Bytes written past the cap and dropped.
    pub dropped: u64,
}

impl Captured {
    pub fn truncated(&self) -> bool {
        self.dropped > 0
    }

    /// The marker vmgrid appends where it cut a stream.
    pub fn truncation_note(&self) -> Option<String> {
        self.truncated().then(|| {
            format!("[vmgrid: output truncated at {} bytes; {} more bytes dropped]", self.bytes.len(), self.dropped)
        })
    }
}

pub(crate) enum Echo {
    None,
    Stdout,
    Stderr,
}

struct Inner {
    cap: usize,
    captured: Captured,
    echo: Echo,
    /// Where the kept bytes are copied too as they come (a wasm worker's memfd, which its parent
    /// reads should it have to kill the worker).
    mirror: Option<Arc<std::fs::File>>,
}

/// A shareable, bounded sink. Clones write to the same capture.
#[derive(Clone)]
pub struct CaptureSink(Arc<Mutex<Inner>>);

impl CaptureSink {
    pub(crate) fn new(cap: usize, echo: Echo) -> CaptureSink {
        CaptureSink(Arc::new(Mutex::new(Inner { cap, captured: Captured::default(), echo, mirror: None })))
    }

    /// A sink that keeps the first `cap` bytes and echoes nothing.
    pub fn bounded(cap: usize) -> CaptureSink {
        CaptureSink::new(cap, Echo::None)
    }

    /// How many bytes were dropped past the cap so far.
    pub fn dropped(&self) -> u64 {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).captured.dropped
    }

    /// A copy of what was captured so far, leaving it in place.
    pub fn snapshot(&self) -> Captured {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).captured.clone()
    }

    pub fn write(&self, buf: &[u8]) {
        let mut inner = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let room = inner.cap - inner.captured.bytes.len();
        let keep = buf.len().min(room);
        if keep > 0 {
            inner.captured.bytes.extend_from_slice(&buf[..keep]);
            if let Some(m) = &inner.mirror {
                // Best effort too: the run's own capture is what its answer carries.
                let _ = (&**m).write_all(&buf[..keep]);
            }
            // Echo is best effort: a closed terminal must not fail the job.
            let _ = match inner.echo {
                Echo::None => Ok(()),
                Echo::Stdout => {
                    std::io::stdout().lock().write_all(&buf[..keep]).and_then(|_| std::io::stdout().flush())
                }
                Echo::Stderr => std::io::stderr().lock().write_all(&buf[..keep]),
            };
        }
        inner.captured.dropped += (buf.len() - keep) as u64;
    }

    /// The stdout and stderr sinks of one job, echoing to ours if the config says so.
    pub(crate) fn pair(config: &crate::RuntimeConfig) -> (CaptureSink, CaptureSink) {
        let (out, err) = if config.echo { (Echo::Stdout, Echo::Stderr) } else { (Echo::None, Echo::None) };
        (CaptureSink::new(config.output_cap, out), CaptureSink::new(config.output_cap, err))
    }

    /// Copies what is kept from now on to `file` as well.
    pub(crate) fn mirror_to(&self, file: Arc<std::fs::File>) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).mirror = Some(file);
    }

    pub fn take(&self) -> Captured {
        let mut inner = self.0.lock().unwrap_or_else(|p| p.into_inner());
        std::mem::take(&mut inner.captured)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_first_cap_bytes_and_counts_the_rest() {
        let s = CaptureSink::new(5, Echo::None);
        s.write(b"abc");
        s.write(b"defgh");
        s.write(b"ij");
        let c = s.take();
        assert_eq!(c.bytes, b"abcde");
        assert_eq!(c.dropped, 5);
        assert!(c.truncation_note().unwrap().contains("5 more bytes"));
    }
}
