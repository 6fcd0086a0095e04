//! keylease-test-kits: what the tests and benchmarks stand on, kept out of the product's
//! crates and depending on none of them (so a test that uses it links no second copy of the
//! server).
//!
//! - [`redis_server`]: a `redis-server` of its own, on a free loopback port.
//! - [`pki`]: a CA, a server certificate and client certificates, made on the spot.
#![forbid(unsafe_code)]

pub mod pki;
pub mod redis_server;

pub use pki::TestPki;
pub use redis_server::RedisServer;
