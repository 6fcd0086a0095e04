//! The README's Python example, run against a real server: keylease from any language.

mod support;

use support::*;

#[tokio::test]
async fn the_python_example_borrows_and_returns_a_key() {
    let server = TestServer::start(&config_toml(&[("k1", "p1")], 100, "")).await;
    let address = server.address.trim_start_matches("http://").to_string();
    let stdout = run_python_example(address, Vec::new()).await;
    assert!(stdout.contains("leased k1 of project p1"), "{stdout}");
    assert!(
        stdout.contains("released: True, booked 1 request(s) and 12 input tokens"),
        "{stdout}"
    );
}
