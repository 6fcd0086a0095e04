//! Every scenario once at smoke size, so the benchmark keeps working. Its figures are not
//! asserted: on a shared CI machine they mean nothing. The batch scenario runs the `keylease`
//! binary, which `cargo test --workspace` builds beside this one.

use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

#[test]
fn every_scenario_runs_at_smoke_size() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_keylease-bench"))
        .args(["all", "--smoke"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (sender, exit) = mpsc::channel();
    std::thread::spawn(move || {
        let output = std::io::read_to_string(stdout).unwrap_or_default();
        let _ = sender.send((child.wait(), output));
    });
    let (status, output) = exit
        .recv_timeout(Duration::from_secs(300))
        .expect("the smoke run finished in time");
    assert!(status.unwrap().success(), "{output}");
    for table in [
        "### Overhead",
        "### Scale",
        "### Quota utilization",
        "### Hostile clients",
        "### Recovery",
        "### Replicas on Redis",
        "### Gemini-compatible proxy",
        "### keylease batch",
        "### The google-genai SDK through the proxy",
        "| durable |",
        "| keylease |",
    ] {
        assert!(output.contains(table), "{table} missing from:\n{output}");
    }
}
