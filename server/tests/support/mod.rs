//! The `keylease-server` binary of this build, run as an operator runs it: on an ephemeral
//! loopback port with JSON logs, everything it prints kept, its address read from its log.
#![allow(dead_code)]

pub mod audit;

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

pub const BINARY: &str = env!("CARGO_BIN_EXE_keylease-server");

/// A running server, killed when dropped unless waited for.
pub struct Running {
    child: Option<Child>,
    pub address: String,
    output: Arc<Mutex<String>>,
    /// The threads reading its output: each ends once the process has exited.
    readers: Vec<std::thread::JoinHandle<()>>,
}

/// A fresh directory under the system's temporary one.
pub fn scratch_dir(name: &str) -> std::path::PathBuf {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("keylease-{name}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Starts the server with `--config config`, on 127.0.0.1:0, with `env` set, on a state
/// directory of its own.
pub fn start(config: &str, env: &[(&str, &str)]) -> Running {
    let state_dir = scratch_dir("binary-state");
    let state_dir = state_dir.to_str().unwrap();
    start_with(config, env, &["--state-dir", state_dir])
}

/// Starts the server as [`start`] does, with `args` added.
pub fn start_with(config: &str, env: &[(&str, &str)], args: &[&str]) -> Running {
    try_start(config, env, args)
        .unwrap_or_else(|output| panic!("the server did not report that it is serving:\n{output}"))
}

/// Starts the server; `Err` with everything it printed if it did not report serving.
pub fn try_start(config: &str, env: &[(&str, &str)], args: &[&str]) -> Result<Running, String> {
    try_start_on("127.0.0.1:0", config, env, args)
}

/// Starts the server as [`try_start`] does, listening on `listen`.
pub fn try_start_on(
    listen: &str,
    config: &str,
    env: &[(&str, &str)],
    args: &[&str],
) -> Result<Running, String> {
    try_start_wrapped(&[], listen, config, env, args)
}

/// Starts the server as [`try_start_on`] does, under `wrapper` (`prlimit --nofile=1024 --`).
pub fn try_start_wrapped(
    wrapper: &[&str],
    listen: &str,
    config: &str,
    env: &[(&str, &str)],
    args: &[&str],
) -> Result<Running, String> {
    let mut command = match wrapper.split_first() {
        Some((program, wrapper_args)) => {
            let mut command = Command::new(program);
            command.args(wrapper_args).arg(BINARY);
            command
        }
        None => Command::new(BINARY),
    };
    let mut child = command
        .args([
            "--config",
            config,
            "--listen",
            listen,
            "--log-format",
            "json",
        ])
        .args(args)
        .envs(env.iter().copied())
        .env_remove("GEMINI_API_KEY")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let output = Arc::new(Mutex::new(String::new()));
    let (found, address) = mpsc::channel();
    let streams: [Box<dyn Read + Send>; 2] = [
        Box::new(child.stderr.take().unwrap()),
        Box::new(child.stdout.take().unwrap()),
    ];
    // Each is read to its end, so the server never blocks on a full pipe.
    let mut readers = Vec::new();
    for stream in streams {
        let (output, found) = (output.clone(), found.clone());
        readers.push(std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                if line.contains("keylease serving")
                    && let Some(address) = line
                        .split("\"address\":\"")
                        .nth(1)
                        .and_then(|rest| rest.split('"').next())
                {
                    let _ = found.send(address.to_string());
                }
                let mut output = output.lock().unwrap();
                output.push_str(&line);
                output.push('\n');
            }
        }));
    }
    match address.recv_timeout(Duration::from_secs(30)) {
        Ok(address) => Ok(Running {
            child: Some(child),
            address,
            output,
            readers,
        }),
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            // The readers finish once the pipes close.
            for reader in readers {
                let _ = reader.join();
            }
            Err(output.lock().unwrap().clone())
        }
    }
}

impl Running {
    /// Everything it printed so far.
    pub fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    /// `http://ADDRESS` of the Gemini-compatible proxy, once it has logged that it serves
    /// (within ten seconds).
    pub fn proxy_url(&self) -> String {
        for _ in 0..100 {
            let output = self.output();
            if let Some(address) = output
                .split("proxy at http://")
                .nth(1)
                .and_then(|rest| rest.split('"').next())
            {
                return format!("http://{address}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("no proxy address logged:\n{}", self.output())
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Sends it `signal` (`TERM`, `INT`, `HUP`, ...) as `kill` does.
    pub fn signal(&self, signal: &str) {
        let sent = Command::new("kill")
            .args([&format!("-{signal}"), &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(sent.success(), "kill -{signal} failed");
    }

    /// Waits at most `limit` for it to exit; its exit status (`None` if it did not) and
    /// everything it printed.
    pub fn wait_with_output(mut self, limit: Duration) -> (Option<ExitStatus>, String) {
        let output = self.output.clone();
        let readers = std::mem::take(&mut self.readers);
        let status = self.wait(limit);
        if status.is_some() {
            // Its last lines are read once the pipes close.
            for reader in readers {
                let _ = reader.join();
            }
        }
        let printed = output.lock().unwrap().clone();
        (status, printed)
    }

    /// Waits at most `limit` for it to exit; `None` if it did not.
    pub fn wait(mut self, limit: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take().expect("running");
        let (exited, exit) = mpsc::channel();
        std::thread::spawn(move || {
            let status = child.wait();
            let _ = exited.send(status);
        });
        exit.recv_timeout(limit).ok().map(Result::unwrap)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The status the server at `address` (`host:port`, plaintext) serves.
pub async fn status_of(address: &str) -> keylease::pb::GetStatusResponse {
    let mut client =
        keylease::pb::key_lease_client::KeyLeaseClient::connect(format!("http://{address}"))
            .await
            .unwrap();
    client
        .get_status(keylease::pb::GetStatusRequest::default())
        .await
        .unwrap()
        .into_inner()
}
