//! The `keylease-server` binary of this build, run as an operator runs it: on an ephemeral
//! loopback port with JSON logs, everything it prints kept, its address read from its log.
#![allow(dead_code)]

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
}

/// Starts the server with `--config config`, on 127.0.0.1:0, with `env` set.
pub fn start(config: &str, env: &[(&str, &str)]) -> Running {
    let mut child = Command::new(BINARY)
        .args([
            "--config",
            config,
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ])
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
    for stream in streams {
        let (output, found) = (output.clone(), found.clone());
        std::thread::spawn(move || {
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
        });
    }
    match address.recv_timeout(Duration::from_secs(30)) {
        Ok(address) => Running {
            child: Some(child),
            address,
            output,
        },
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the server did not report that it is serving:\n{}",
                output.lock().unwrap()
            );
        }
    }
}

impl Running {
    /// Everything it printed so far.
    pub fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
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
