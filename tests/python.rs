//! The README's Python example, run against a real server: keylease from any language.

mod support;

use std::process::Command;
use support::*;

#[tokio::test]
async fn the_python_example_borrows_and_returns_a_key() {
    let server = TestServer::start(&config_toml(&[("k1", "p1")], 100, "")).await;
    let address = server.address.trim_start_matches("http://").to_string();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/python/keylease_example.py"
    );
    let output = tokio::task::spawn_blocking(move || {
        Command::new("python3").args([script, &address]).output()
    })
    .await
    .unwrap()
    .expect("python3 runs (scripts/test installs grpcio and grpcio-tools)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("leased k1 of project p1"), "{stdout}");
    assert!(
        stdout.contains("released: True, booked 1 request(s) and 12 input tokens"),
        "{stdout}"
    );
}
