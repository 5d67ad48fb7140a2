//! JVM jobs: offered only by nodes whose operator opts in (`--jvm`), and run confined: a hostile
//! jar sees no host files beyond its job directory, has no network, and is not root.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util::{JobDir, Pool, ids_of, stderr_of, stdout_of, toml_path};

/// A jar that tries what a hostile job would, and reports each attempt on stdout.
const HOSTILE: &str = r#"
import java.nio.file.*;
public class Hostile {
  public static void main(String[] a) throws Exception {
    String status = new String(Files.readAllBytes(Paths.get("/proc/self/status")));
    status.lines().filter(l -> l.startsWith("Uid:")).forEach(System.out::println);
    try { Files.write(Paths.get(a[0]), "planted".getBytes()); System.out.println("host write: done"); }
    catch (Exception e) { System.out.println("host write: refused"); }
    System.out.println("host dir visible: " + Files.exists(Paths.get(a[0]).getParent()));
    try { new java.net.Socket("127.0.0.1", Integer.parseInt(a[1])).close(); System.out.println("network: connected"); }
    catch (Exception e) { System.out.println("network: refused"); }
    Files.write(Paths.get("out.txt"), "from the jvm".getBytes());
    System.out.println("cwd: " + Paths.get("").toAbsolutePath());
  }
}
"#;

/// Compiles [`HOSTILE`] into `dir/hostile.jar` with the JDK's javac and jar.
fn hostile_jar(dir: &Path) -> PathBuf {
    let src = dir.join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("Hostile.java"), HOSTILE).unwrap();
    let ok = Command::new("javac").arg("-d").arg(&src).arg(src.join("Hostile.java")).status().unwrap();
    assert!(ok.success(), "javac failed (scripts/setup installs a JDK)");
    std::fs::write(src.join("manifest"), "Main-Class: Hostile\n").unwrap();
    let jar = dir.join("hostile.jar");
    let ok = Command::new("jar")
        .arg("cfm")
        .arg(&jar)
        .arg(src.join("manifest"))
        .arg("-C")
        .arg(&src)
        .arg("Hostile.class")
        .status()
        .unwrap();
    assert!(ok.success(), "jar failed");
    jar
}

#[test]
fn jvm_jobs_go_only_to_nodes_that_opt_in_and_run_confined_without_host_files_network_or_root() {
    let mut pool = Pool::start();
    pool.start_node("plain", 1);
    let plain = pool.admin().nodes().unwrap();
    assert!(!plain[0].ad.vm_types.contains(&vmgrid_proto::VmType::Jvm), "a node offers jvm without --jvm");
    pool.start_node_with("javan", 1, &["--jvm"]);
    let javan = pool.admin().nodes().unwrap().into_iter().find(|n| n.ad.name == "javan").unwrap();
    assert!(javan.ad.vm_types.contains(&vmgrid_proto::VmType::Jvm), "--jvm did not offer jvm");

    let d = JobDir::new();
    let jar = hostile_jar(d.path());
    // A host file outside the job directory that the test could write, and a port it listens on.
    let host = tempfile::tempdir().unwrap();
    let target = host.path().join("planted");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    let job = d.job(&format!(
        "name = \"hostile-jar\"\n[vm]\ntype = \"jvm\"\nimage = {}\nargs = [{:?}, {port:?}]\n[resources]\nmemory_mb = 128\ntimeout_s = 120\n[files]\noutputs = [\"out.txt\"]\n",
        toml_path(&jar),
        target.display().to_string(),
    ));
    let out = pool.cli().arg("submit").arg(&job).arg("--wait").output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    let id = ids_of(&out)[0];
    assert_eq!(pool.job(id).node.as_deref(), Some("javan"), "the jvm job ran on a node that did not opt in");
    let logs = stdout_of(&pool.cli().args(["logs", &id.to_string()]).output().unwrap());
    let uid = logs.lines().find(|l| l.starts_with("Uid:")).unwrap_or_else(|| panic!("no Uid line: {logs}"));
    assert!(uid.split_whitespace().skip(1).all(|u| u != "0"), "the JVM ran as root: {uid}");
    assert!(logs.contains("host write: refused"), "{logs}");
    assert!(logs.contains("host dir visible: false"), "{logs}");
    assert!(logs.contains("network: refused"), "{logs}");
    assert!(logs.contains("cwd: /job"), "{logs}");
    assert!(!target.exists(), "the jar wrote a host file");
    let fetched = d.path().join("fetched");
    pool.cli().args(["fetch", &id.to_string(), "--out"]).arg(&fetched).assert().success();
    assert_eq!(std::fs::read_to_string(fetched.join("out.txt")).unwrap(), "from the jvm");
}

#[test]
fn a_node_asked_for_jvm_without_bubblewrap_refuses_to_start_and_says_what_to_install() {
    let pool = Pool::start();
    let out = Command::new(assert_cmd::cargo::cargo_bin("vmgrid"))
        .args(["node", "--jvm", "--pool", &pool.url, "--name", "nob"])
        .arg("--token-file")
        .arg(pool.data_dir().join("pool.token"))
        .env("VMGRID_BWRAP", "/nonexistent/bwrap")
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    let err = stderr_of(&out);
    assert!(err.contains("--jvm") && err.contains("bubblewrap"), "{err}");
}
