//! A `redis-server` of our own, for tests and benchmarks: started on a free loopback port in a
//! directory of its own, with every write fsync'd to its append-only file (as the README asks of
//! production), and stopped by its pid. It never touches a Redis it did not start. When
//! `redis-server` is missing it panics saying how to install it: tests that need Redis never
//! skip silently.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Longest a start may take before it is a failure.
const START_TIMEOUT: Duration = Duration::from_secs(20);

pub struct RedisServer {
    pub port: u16,
    dir: PathBuf,
    /// `always`, or `everysec` (benchmarks: the cost of `always`).
    appendfsync: &'static str,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts one in a new directory under the system's temporary directory.
    pub fn start() -> Self {
        Self::start_with_fsync("always")
    }

    /// Starts one whose append-only file is fsync'd as `appendfsync` says.
    pub fn start_with_fsync(appendfsync: &'static str) -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("keylease-redis-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a directory for redis-server");
        let mut server = Self {
            port: free_port(),
            dir,
            appendfsync,
            child: None,
        };
        // Another process may take the free port before redis-server binds it: try another.
        for _ in 0..5 {
            if server.try_start().is_ok() {
                return server;
            }
            server.port = free_port();
        }
        server.start_again();
        server
    }

    /// `redis://127.0.0.1:PORT/0`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts it (again) on the same port and directory: it reloads its append-only file.
    pub fn start_again(&mut self) {
        if let Err(reason) = self.try_start() {
            panic!("{reason}");
        }
    }

    fn try_start(&mut self) -> Result<(), String> {
        let spawned = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port"])
            .arg(self.port.to_string())
            .arg("--dir")
            .arg(&self.dir)
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                self.appendfsync,
                "--save",
                "",
                "--maxmemory-policy",
                "noeviction",
                "--daemonize",
                "no",
                "--logfile",
                "redis.log",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match spawned {
            Ok(child) => child,
            Err(error) => panic!(
                "cannot start redis-server ({error}): install it with `apt-get install -y redis-server` (scripts/test does)"
            ),
        };
        let pid = child.id();
        self.child = Some(child);
        let client = redis::Client::open(self.url()).expect("a valid url");
        // A duration for a start-up wait, not a reading anything decides by.
        #[allow(clippy::disallowed_methods)]
        let began = std::time::Instant::now();
        loop {
            // Only our own answers: another process may hold the port.
            let info = client
                .get_connection_with_timeout(Duration::from_secs(1))
                .and_then(|mut c| redis::cmd("INFO").arg("server").query::<String>(&mut c));
            if info.is_ok_and(|info| info.contains(&format!("process_id:{pid}\r"))) {
                return Ok(());
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                return Err(format!(
                    "redis-server exited at start ({status}); its log: {}",
                    self.dir.join("redis.log").display()
                ));
            }
            if began.elapsed() > START_TIMEOUT {
                return Err(format!(
                    "redis-server did not answer within {START_TIMEOUT:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills it at once (SIGKILL), as a crash would: what it acknowledged is in its fsync'd
    /// append-only file.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// A connection for a test to look or meddle (`FLUSHALL`).
    pub fn connection(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(5)))
            .expect("a connection to the test's redis-server")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A port nobody listens on now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}
