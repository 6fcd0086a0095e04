//! keylease-server: lends API keys to workers as time-bounded leases, around the lease engine
//! (crate `keylease-engine`).
//!
//! - [`config`]: configuration and key sources, validated before anything starts.
//! - [`service`]: the gRPC service, a thin shell that maps the protocol onto the engine.
//! - [`in_process`]: the same service's lease calls in this process, without a connection.
//! - [`admin`]: reloads and the admin service: keys, limits and callers changed live.
//! - [`auth`]: who calls and what each role may do: tokens by hash, client certificates.
//! - [`server`]: serving on a listener, with health and reflection, until a shutdown future.
//! - [`connections`]: what client connections may hold: how many, and how long idle.
//! - [`fleet`]: the fleet of replicas as this one sees it, for `GetStatus`.
//! - [`shell`]: the engine's shell: one lock, the store's journal, waiters' channels, events,
//!   the expiry timer.
//! - [`store`]: durable state: the log of commands and snapshots, recovery, group commit.
//! - [`lock_file`]: a lock file naming the process that holds it (state directories, outputs).
//! - [`tls`]: TLS on the gRPC port from PEM files, reread by a reload; mutual TLS.
//! - [`metrics`]: Prometheus metrics on an HTTP port: counters as things happen, gauges at a scrape.
//! - [`wire`]: conversions between the protocol and the engine, and errors to gRPC statuses.
//! - [`secret`]: the ids and fingerprints derived from API keys, and the one redaction of
//!   secrets in free text.
//! - [`proxy`]: the Gemini-compatible HTTP proxy, leasing a key for each upstream call.
//! - [`key_checks`]: checking keys with the provider (`[health]`), on schedule and on demand.
//! - [`key_sources`]: keys read again by themselves: on a schedule, and when the file changes.
//! - [`replica`]: replicas on Redis: the shared log, leading, following, forwarding.
//! - [`clock`]: the one place that reads the time.
//! - [`logs`]: how the binaries log; [`exit`]: the exit codes they share.
#![forbid(unsafe_code)]

pub mod admin;
pub mod auth;
pub mod builder;
pub mod clock;
pub mod config;
pub mod connections;
pub mod exit;
pub mod fleet;
pub mod in_process;
pub mod key_checks;
pub mod key_sources;
pub mod lock_file;
pub mod logs;
pub mod metrics;
pub mod proxy;
pub mod replica;
pub mod secret;
pub mod server;
pub mod service;
pub mod shell;
pub mod store;
pub mod tls;
pub mod wire;
