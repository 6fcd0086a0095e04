//! Real processes on loopback: this binary run again in a role (server, fake Gemini, worker),
//! their addresses, their memory, and the machine the figures come from.

use anyhow::{Context, bail};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// A child process, killed when dropped.
pub struct Child {
    /// `None` once handed to [`Child::wait`].
    child: Option<std::process::Child>,
    /// What it printed after `listening on `, for servers.
    pub address: String,
    /// Its further output lines.
    pub lines: mpsc::Receiver<String>,
}

/// Starts this binary with `args`; for servers, waits until it prints `listening on ADDRESS`.
pub fn spawn(args: &[String], server: bool) -> anyhow::Result<Child> {
    spawn_from(&std::env::current_exe()?, args, server)
}

/// Starts `exe` (this binary, or another build of it) with `args`, as [`spawn`] does.
pub fn spawn_from(exe: &std::path::Path, args: &[String], server: bool) -> anyhow::Result<Child> {
    let mut child = Command::new(exe)
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .context("starting a bench process")?;
    let stdout = BufReader::new(child.stdout.take().expect("piped"));
    let (sender, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in stdout.lines().map_while(Result::ok) {
            if sender.send(line).is_err() {
                return;
            }
        }
    });
    let mut address = String::new();
    if server {
        let line = lines
            .recv_timeout(Duration::from_secs(120))
            .context("the server did not start")?;
        let Some(found) = line.strip_prefix("listening on ") else {
            bail!("unexpected first line {line:?}")
        };
        address = found.to_string();
    }
    Ok(Child {
        child: Some(child),
        address,
        lines,
    })
}

impl Child {
    /// The proxy address a server started in the `serve` role prints after its own (`http://…`).
    pub fn proxy_url(&self) -> anyhow::Result<String> {
        self.lines
            .recv_timeout(Duration::from_secs(30))?
            .strip_prefix("proxy on ")
            .map(str::to_string)
            .ok_or_else(|| anyhow::anyhow!("the server printed no proxy address"))
    }

    /// Peak resident memory so far, in MiB (`VmHWM`).
    pub fn peak_memory_mib(&self) -> Option<f64> {
        self.status_mib("VmHWM:")
    }

    /// Resident memory now, in MiB (`VmRSS`).
    pub fn memory_mib(&self) -> Option<f64> {
        self.status_mib("VmRSS:")
    }

    fn status_mib(&self, field: &str) -> Option<f64> {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.child.as_ref()?.id())).ok()?;
        let line = status.lines().find(|l| l.starts_with(field))?;
        let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib / 1024.0)
    }

    /// CPU time (user + system) the process has used so far.
    pub fn cpu_time(&self) -> Option<Duration> {
        cpu_time_of(&self.child.as_ref()?.id().to_string())
    }

    /// Sends it SIGTERM, as an operator stops a server.
    pub fn terminate(&self) -> anyhow::Result<()> {
        let pid = self.child.as_ref().context("already waited for")?.id();
        let sent = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()?;
        anyhow::ensure!(sent.success(), "kill -TERM {pid} failed");
        Ok(())
    }

    /// Waits for the process to end, at most `limit`.
    pub fn wait(mut self, limit: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let mut child = self.child.take().expect("waited for once");
        let (sender, exit) = mpsc::channel();
        std::thread::spawn(move || sender.send(child.wait()));
        Ok(exit
            .recv_timeout(limit)
            .context("a bench process did not finish")??)
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// CPU time (user + system) used so far by process `pid` ("self" for this one), from
/// `/proc/PID/stat`, in the kernel's clock ticks (100 a second on Linux).
pub fn cpu_time_of(pid: &str) -> Option<Duration> {
    stat_ticks(pid, 11)
}

/// CPU time (user + system) of this process's children that have ended and been waited for:
/// read before and after a child runs, what the child used.
pub fn children_cpu_time() -> Option<Duration> {
    stat_ticks("self", 13)
}

/// The sum of the two tick counts from field `first` (counted after the command name) of
/// `/proc/PID/stat`.
fn stat_ticks(pid: &str, first: usize) -> Option<Duration> {
    const TICKS_PER_SECOND: u64 = 100;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; the fields after it are plain numbers.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 =
        fields.get(first)?.parse::<u64>().ok()? + fields.get(first + 1)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 1000 / TICKS_PER_SECOND))
}

/// Runs this process, and so every process it starts, on the last core alone (core 0 takes
/// the machine's interrupts). On the VMs here, waking another vCPU for each reply costs
/// milliseconds and made figures swing twofold between runs; on one core they repeat within a
/// few percent, and a ratio compares the whole CPU cost of a call, client and server together.
pub fn run_on_one_core() -> String {
    let last = std::thread::available_parallelism().map_or(1, |n| n.get()) - 1;
    let pid = std::process::id().to_string();
    match Command::new("taskset")
        .args(["-a", "-p", "-c", &last.to_string(), &pid])
        .output()
    {
        Ok(output) if output.status.success() => format!("every process on core {last}"),
        _ => "processes placed by the scheduler (taskset unavailable)".to_string(),
    }
}

/// A fresh directory for a scenario's files.
pub fn scratch(name: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("keylease-bench-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// "2 cores, 23 GiB" and today's date, for the report.
pub fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let memory_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|k| k.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
    format!(
        "{cores} cores, {memory_gib:.0} GiB, {}",
        chrono::Local::now().format("%Y-%m-%d")
    )
}

/// A keylease configuration: `keys` lines of `SECRET project=P id=ID` in a keys file, one model
/// with `limits` (TOML lines), and `extra` TOML.
pub fn keylease_config(
    dir: &std::path::Path,
    keys: &[(String, String, String)],
    model: &str,
    limits: &str,
    extra: &str,
) -> anyhow::Result<PathBuf> {
    let mut file = String::new();
    for (id, project, secret) in keys {
        file.push_str(&format!("{secret} id={id} project={project}\n"));
    }
    std::fs::write(dir.join("keys.txt"), file)?;
    let config = format!(
        "[key_sources]\nfile = \"keys.txt\"\nenvironment = false\n\n{extra}\n\n[pools.gemini.models.\"{model}\"]\n{limits}\n"
    );
    let path = dir.join("keylease.toml");
    std::fs::write(&path, config)?;
    Ok(path)
}

/// `count` fake keys spread over `projects` projects: (id, project, secret).
pub fn fake_keys(count: usize, projects: usize) -> Vec<(String, String, String)> {
    (0..count)
        .map(|i| {
            (
                format!("k{i}"),
                format!("p{}", i % projects.max(1)),
                format!("AIzaFAKE.bench.{i:06}"),
            )
        })
        .collect()
}

/// A fleet's files in `dir`: the keys' secrets, one a line, for workers that hold keys
/// themselves; and the keys as the fake's configuration lists them.
pub fn fleet_keys(
    dir: &std::path::Path,
    keys: &[(String, String, String)],
) -> anyhow::Result<(PathBuf, Vec<serde_json::Value>)> {
    let secrets = dir.join("secrets.txt");
    std::fs::write(
        &secrets,
        keys.iter()
            .map(|(_, _, s)| format!("{s}\n"))
            .collect::<String>(),
    )?;
    let fake_keys = keys
        .iter()
        .map(|(id, project, secret)| serde_json::json!({"id": id, "secret": secret, "project": project}))
        .collect();
    Ok((secrets, fake_keys))
}

/// Percentile `p` (0 to 1) of sorted samples.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// The store counters a durable `serve` role prints (`journal commits=N records=M ...`).
#[derive(Default)]
pub struct JournalCounts {
    last: (u64, u64, u64),
}

impl JournalCounts {
    /// (commits, records, microseconds in commits) as the server last printed them, after
    /// waiting for a fresh line.
    pub async fn read(&mut self, server: &Child) -> (u64, u64, u64) {
        tokio::time::sleep(crate::roles::STATS_EVERY * 2).await;
        while let Ok(line) = server.lines.try_recv() {
            let Some(counts) = line.strip_prefix(crate::roles::STATS_PREFIX) else {
                continue;
            };
            let field = |name: &str| {
                counts
                    .split_whitespace()
                    .find_map(|f| f.strip_prefix(name))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0)
            };
            self.last = (
                field("commits="),
                field("records="),
                field("commit_micros="),
            );
        }
        self.last
    }
}

/// "ext4 on /dev/vda" for the file system holding `path`, from /proc/mounts.
pub fn file_system_of(path: &std::path::Path) -> String {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.len() > 2 && path.starts_with(fields[1])).then(|| (fields[1].len(), fields))
        })
        .max_by_key(|(len, _)| *len)
        .map_or("an unknown file system".into(), |(_, f)| {
            format!("{} on {}", f[2], f[0])
        })
}

/// Latency of one durable write on the disk under `dir`: 4 KiB written and fdatasync'd,
/// `count` times; (p50, p99) in microseconds.
pub fn fsync_latency(dir: &std::path::Path, count: usize) -> anyhow::Result<(u64, u64)> {
    use std::io::Write;
    std::fs::create_dir_all(dir)?;
    let path = dir.join("fsync-probe");
    let mut file = std::fs::File::create(&path)?;
    let block = [7u8; 4096];
    let mut latencies = Vec::with_capacity(count);
    for _ in 0..count {
        let began = crate::roles::now();
        file.write_all(&block)?;
        file.sync_data()?;
        latencies.push(began.elapsed().as_micros() as u64);
    }
    drop(file);
    std::fs::remove_file(path)?;
    latencies.sort_unstable();
    Ok((percentile(&latencies, 0.5), percentile(&latencies, 0.99)))
}
