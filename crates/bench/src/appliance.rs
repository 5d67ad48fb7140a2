//! The grid appliance's figures: image sizes, build time, boot to joined, power-off to gone.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::engine::coordinator;
use crate::pool::vmgrid_bin;

pub struct ApplianceFigures {
    pub build_s: f64,
    pub sizes_mib: Vec<(String, f64)>,
    pub joined_s: f64,
    pub left_s: f64,
}

/// The grid appliance: the image's size in each format and its build time; one appliance booted
/// by firmware under QEMU (KVM by probe, else TCG): boot to joined, and power-off to gone.
pub fn appliance_figures(root: &Path) -> Result<ApplianceFigures, String> {
    use std::io::BufRead;
    let dir = std::env::temp_dir().join(format!("vmgrid-bench-appliance-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let images = dir.join("image");
    let start = Instant::now();
    let out = Command::new(vmgrid_bin(root))
        .args(["appliance", "build", "--out"])
        .arg(&images)
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!("appliance build: {}", String::from_utf8_lossy(&out.stderr)));
    }
    let build_s = start.elapsed().as_secs_f64();
    let mut sizes_mib = Vec::new();
    for ext in ["img", "qcow2", "vmdk", "vdi"] {
        let len = std::fs::metadata(images.join(format!("vmgrid-appliance.{ext}"))).map_err(|e| e.to_string())?.len();
        sizes_mib.push((ext.to_string(), len as f64 / (1 << 20) as f64));
    }
    let data = dir.join("pool");
    let (mut coord, client) = coordinator(root, &data)?;
    let mut app = Command::new(vmgrid_bin(root))
        .args(["appliance", "start", "--pool", client.url(), "--token-file"])
        .arg(data.join("pool.token"))
        .arg("--image")
        .arg(images.join("vmgrid-appliance.qcow2"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut lines = std::io::BufReader::new(app.stderr.take().expect("piped")).lines();
    let mut joined_s = None;
    for line in lines.by_ref() {
        let line = line.map_err(|e| e.to_string())?;
        // "vmgrid: appliance NAME joined … (12.3 s after boot)"
        if line.contains(" joined ") {
            joined_s = line.rsplit_once('(').and_then(|(_, r)| r.split_whitespace().next()?.parse::<f64>().ok());
            break;
        }
    }
    let result = match joined_s {
        None => Err("the appliance never said it joined".to_string()),
        Some(joined_s) => {
            // SAFETY: signalling our own child, which we have not reaped yet.
            unsafe { libc::kill(app.id() as i32, libc::SIGTERM) };
            let asked = Instant::now();
            while client.nodes().map(|n| !n.is_empty()).unwrap_or(true) && asked.elapsed() < Duration::from_secs(120) {
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(ApplianceFigures { build_s, sizes_mib, joined_s, left_s: asked.elapsed().as_secs_f64() })
        }
    };
    std::thread::spawn(move || for _ in lines {});
    let _ = app.wait();
    let _ = coord.kill();
    let _ = coord.wait();
    let _ = std::fs::remove_dir_all(&dir);
    result
}
