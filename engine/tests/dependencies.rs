//! The engine stays plain: no runtime, no transport, no store, no protocol crate among what it
//! links. Read from `cargo tree`, so that a dependency added by any path fails here.

use std::process::Command;

/// Crates the engine must never link, directly or through another crate.
const FORBIDDEN: &[&str] = &[
    "tokio",
    "tonic",
    "prost",
    "hyper",
    "tower",
    "axum",
    "reqwest",
    "redb",
    "redis",
    "keylease",
    "keylease-server",
    "keylease-client",
];

#[test]
fn the_engine_links_no_runtime_transport_or_store() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
    let output = Command::new(cargo)
        .args([
            "tree",
            "--manifest-path",
            manifest,
            "-p",
            "keylease-engine",
            "-e",
            "normal",
            "--prefix",
            "none",
            "--format",
            "{p}",
            "--offline",
        ])
        .output()
        .expect("cargo runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let names: Vec<&str> = stdout
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .collect();
    assert!(names.contains(&"keylease-engine"), "{stdout}");
    assert!(
        names.contains(&"serde"),
        "the tree lists dependencies: {stdout}"
    );
    let linked: Vec<&&str> = FORBIDDEN.iter().filter(|c| names.contains(c)).collect();
    assert!(
        linked.is_empty(),
        "the engine links {linked:?}; it must stay free of runtimes, transports and stores:\n{stdout}"
    );
}
