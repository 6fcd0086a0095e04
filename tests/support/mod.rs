//! The end-to-end harness: a real keylease server on an ephemeral loopback port, configured
//! through the real configuration loader, and a gRPC client connected to it.
#![allow(dead_code)]

use keylease::pb;
use keylease::pb::key_lease_client::KeyLeaseClient;
use keylease_server::admin::ConfigSource;
use keylease_server::builder::{GrpcListener, LaunchError, OwnLeases, ServerBuilder};
use keylease_server::clock::Clock;
use keylease_server::config::{self, Overrides};
use std::collections::HashMap;
use std::path::PathBuf;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

pub type Client = KeyLeaseClient<Channel>;

tokio::task_local! {
    /// How the servers a test starts lease for their embedded proxy: see [`on_both_paths`].
    pub static OWN_LEASES: OwnLeases;
}

/// Each test named runs twice, in modules `in_process` and `over_grpc`: the servers it starts
/// lease for their embedded proxy by calling their service as functions (a single server's
/// way) and through their gRPC service, as a remote keylease is called. The tests are plain
/// `async fn`s of the file.
#[macro_export]
macro_rules! on_both_paths {
    ($($name:ident),* $(,)?) => {
        mod in_process {
            $(
                #[tokio::test]
                async fn $name() {
                    let own = keylease_server::builder::OwnLeases::InProcess;
                    $crate::support::OWN_LEASES.scope(own, super::$name()).await
                }
            )*
        }
        mod over_grpc {
            $(
                #[tokio::test]
                async fn $name() {
                    let own = keylease_server::builder::OwnLeases::OverGrpc;
                    $crate::support::OWN_LEASES.scope(own, super::$name()).await
                }
            )*
        }
    };
}
pub const MODEL: &str = "gemini-2.5-flash";

/// A fleet's keys: 12 in 5 projects, the last project with two.
pub const FLEET_KEYS: [(&str, &str); 12] = [
    ("k01", "p1"),
    ("k02", "p1"),
    ("k03", "p1"),
    ("k04", "p2"),
    ("k05", "p2"),
    ("k06", "p3"),
    ("k07", "p3"),
    ("k08", "p3"),
    ("k09", "p4"),
    ("k10", "p4"),
    ("k11", "p5"),
    ("k12", "p5"),
];

/// A key for a test configuration: (id, project).
pub fn fake_secret(id: &str) -> String {
    format!("AIzaFAKE.e2e-{id}-{}", "0".repeat(24))
}

/// The TOML of a pool whose keys are `keys` and whose model allows `rpm` requests a minute.
pub fn config_toml(keys: &[(&str, &str)], rpm: u64, extra: &str) -> String {
    let mut text = format!(
        "[key_sources]\nenvironment = false\n\n[pools.gemini.models.\"{MODEL}\"]\nrequests_per_minute = {rpm}\nrequests_per_day = 100000\n\n{extra}\n"
    );
    for (id, project) in keys {
        text.push_str(&format!(
            "[[keys]]\nid = \"{id}\"\nproject = \"{project}\"\nsecret = \"{}\"\n\n",
            fake_secret(id)
        ));
    }
    text
}

/// A fake Gemini whose keys are the test configuration's, each in its project, serving
/// `MODEL` with these per-project limits.
pub async fn start_fake(
    keys: &[(&str, &str)],
    limits: fake_gemini::limits::Limits,
    time_scale: f64,
) -> fake_gemini::RunningFake {
    start_fake_with(
        keys,
        limits,
        &[],
        time_scale,
        fake_gemini::Faults::default(),
    )
    .await
}

/// [`start_fake`], with other limits for some projects and provider faults.
pub async fn start_fake_with(
    keys: &[(&str, &str)],
    limits: fake_gemini::limits::Limits,
    projects: &[(&str, fake_gemini::limits::Limits)],
    time_scale: f64,
    faults: fake_gemini::Faults,
) -> fake_gemini::RunningFake {
    let config = fake_gemini::FakeConfig {
        projects: projects
            .iter()
            .map(|(project, limits)| {
                let per_model = [(MODEL.to_string(), *limits)].into();
                (project.to_string(), per_model)
            })
            .collect(),
        keys: keys
            .iter()
            .map(|(id, project)| fake_gemini::FakeKey {
                id: id.to_string(),
                secret: fake_secret(id),
                project: project.to_string(),
                health: fake_gemini::KeyHealth::Healthy,
            })
            .collect(),
        models: [(MODEL.to_string(), limits)].into(),
        time_scale,
        faults,
        seed: 7,
    };
    fake_gemini::FakeGemini::start(config)
        .await
        .expect("fake gemini")
}

pub struct TestServer {
    pub address: String,
    /// `http://ADDRESS` of the Gemini-compatible proxy, when `[proxy]` is configured.
    pub proxy_url: Option<String>,
    /// `http://ADDRESS/metrics`.
    pub metrics_url: String,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<Result<(), LaunchError>>>,
    config_dir: PathBuf,
}

impl TestServer {
    /// Starts a server on 127.0.0.1:0 with this configuration text.
    pub async fn start(config_text: &str) -> Self {
        Self::start_with_files(config_text, &[]).await
    }

    /// Starts a server with this configuration text and these files (name, text) beside it.
    pub async fn start_with_files(config_text: &str, files: &[(&str, &str)]) -> Self {
        Self::start_on_clock(config_text, files, Clock::system()).await
    }

    /// [`TestServer::start_with_files`], its state on `clock` (a test that counts by the
    /// minute starts it at a minute's beginning).
    pub async fn start_on_clock(config_text: &str, files: &[(&str, &str)], clock: Clock) -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let config_dir =
            std::env::temp_dir().join(format!("keylease-e2e-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&config_dir).unwrap();
        for (name, text) in files {
            std::fs::write(config_dir.join(name), text).unwrap();
        }
        let path = config_dir.join("keylease.toml");
        std::fs::write(&path, config_text).unwrap();
        let settings = config::load(Some(&path), &HashMap::new(), &Overrides::default())
            .expect("test configuration");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = format!("http://{}", listener.local_addr().unwrap());
        let metrics_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let metrics_url = format!("http://{}/metrics", metrics_listener.local_addr().unwrap());
        let source = ConfigSource {
            path: Some(path),
            ..ConfigSource::default()
        };
        let own_leases = OWN_LEASES.try_with(|own| *own).unwrap_or_default();
        let server = ServerBuilder::new(source, settings)
            .clock(clock)
            .own_leases(own_leases)
            .metrics(Some(metrics_listener))
            .build(GrpcListener::Tcp(listener))
            .await
            .expect("a server of the test configuration");
        let proxy_url = server
            .proxy_address
            .map(|address| format!("http://{address}"));
        let (stop, stopped) = oneshot::channel();
        let handle = tokio::spawn(server.serve(async {
            let _ = stopped.await;
        }));
        Self {
            address,
            proxy_url,
            metrics_url,
            stop: Some(stop),
            handle: Some(handle),
            config_dir,
        }
    }

    /// The directory of the configuration file (`keylease.toml`), for files beside it.
    pub fn config_dir(&self) -> &std::path::Path {
        &self.config_dir
    }

    pub async fn client(&self) -> Client {
        KeyLeaseClient::connect(self.address.clone())
            .await
            .expect("connect")
    }

    /// What `GetStatus` answers now (the first page).
    pub async fn status(&self) -> pb::GetStatusResponse {
        self.client()
            .await
            .get_status(pb::GetStatusRequest::default())
            .await
            .expect("status")
            .into_inner()
    }

    /// Waits (bounded, looking every 20 ms) until `done` holds of the status; panics with the
    /// last status when it does not within `within`.
    pub async fn until_status(
        &self,
        within: std::time::Duration,
        done: impl Fn(&pb::GetStatusResponse) -> bool,
    ) -> pb::GetStatusResponse {
        const EVERY: std::time::Duration = std::time::Duration::from_millis(20);
        for _ in 0..within.as_millis() / EVERY.as_millis() {
            let status = self.status().await;
            if done(&status) {
                return status;
            }
            tokio::time::sleep(EVERY).await;
        }
        panic!("not within {within:?}: {:#?}", self.status().await);
    }

    /// The value of one series of the server's metrics (`name{labels}` as Prometheus prints
    /// it); 0 when it has none yet.
    pub async fn metric(&self, series: &str) -> f64 {
        let text = reqwest::get(&self.metrics_url)
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text");
        let prefix = format!("{series} ");
        text.lines()
            .find_map(|line| line.strip_prefix(&prefix)?.parse().ok())
            .unwrap_or(0.0)
    }

    /// The server's event stream, from now on.
    pub async fn watch(&self) -> tonic::Streaming<pb::Event> {
        self.client()
            .await
            .watch_events(pb::WatchEventsRequest {})
            .await
            .expect("watch")
            .into_inner()
    }

    /// A client whose task `holder` holds the only free key, and `waiter` in line behind it,
    /// willing to wait `wait_seconds`.
    pub async fn held_with_waiter(
        &self,
        waiter: &str,
        wait_seconds: u64,
    ) -> (
        Client,
        pb::Lease,
        JoinHandle<Result<tonic::Response<pb::Lease>, tonic::Status>>,
    ) {
        let mut client = self.client().await;
        let held = client
            .acquire_key(acquire("holder"))
            .await
            .expect("the key")
            .into_inner();
        let waiting = spawn_acquire(
            self,
            pb::AcquireKeyRequest {
                wait: seconds(wait_seconds),
                ..acquire(waiter)
            },
        )
        .await;
        until_waiting(&mut client, 1).await;
        (client, held, waiting)
    }

    /// Starts the graceful shutdown and waits until the server has stopped.
    pub async fn shut_down(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(handle) = self.handle.take() {
            handle.await.unwrap().unwrap();
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = std::fs::remove_dir_all(&self.config_dir);
    }
}

/// Runs the README's Python example against `address` with `env` set, and returns what it
/// printed once it succeeded.
pub async fn run_python_example(address: String, env: Vec<(&'static str, String)>) -> String {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/python/keylease_example.py"
    );
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .args([script, &address])
            .envs(env)
            .output()
    })
    .await
    .unwrap()
    .expect("python3 runs (scripts/test installs grpcio and grpcio-tools)");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// A channel whose every call carries `authorization: Bearer TOKEN`.
pub type WithToken = tonic::service::interceptor::InterceptedService<
    Channel,
    Box<dyn FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Send + Sync>,
>;

async fn with_token(server: &TestServer, token: &str) -> WithToken {
    let channel = tonic::transport::Endpoint::from_shared(server.address.clone())
        .unwrap()
        .connect()
        .await
        .expect("connect");
    let header: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
    tonic::service::interceptor::InterceptedService::new(
        channel,
        Box::new(move |mut request: tonic::Request<()>| {
            request
                .metadata_mut()
                .insert("authorization", header.clone());
            Ok(request)
        }),
    )
}

/// An admin client that sends `authorization: Bearer TOKEN` on every call.
pub async fn admin_with_token(
    server: &TestServer,
    token: &str,
) -> pb::key_admin_client::KeyAdminClient<WithToken> {
    pb::key_admin_client::KeyAdminClient::new(with_token(server, token).await)
}

/// A raw gRPC client that sends `authorization: Bearer TOKEN` on every call.
pub async fn raw_with_token(server: &TestServer, token: &str) -> KeyLeaseClient<WithToken> {
    KeyLeaseClient::new(with_token(server, token).await)
}

pub fn acquire(task: &str) -> pb::AcquireKeyRequest {
    pb::AcquireKeyRequest {
        task_id: task.into(),
        model: MODEL.into(),
        ..Default::default()
    }
}

pub fn seconds(s: u64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: s as i64,
        nanos: 0,
    })
}

pub fn millis(ms: u64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    })
}

pub fn release(lease: &pb::Lease, sent: u32) -> pb::ReleaseRequest {
    pb::ReleaseRequest {
        lease_id: lease.lease_id.clone(),
        fencing_token: lease.fencing_token,
        requests_sent: Some(sent),
        input_tokens: Some(0),
        call_duration: None,
    }
}

/// An acquire on its own connection, running in the background (a waiter, typically).
pub async fn spawn_acquire(
    server: &TestServer,
    request: pb::AcquireKeyRequest,
) -> JoinHandle<Result<tonic::Response<pb::Lease>, tonic::Status>> {
    let mut client = server.client().await;
    tokio::spawn(async move { client.acquire_key(request).await })
}

/// The next event that `pick` accepts, among the next hundred.
pub async fn next_event<T>(
    events: &mut tonic::Streaming<pb::Event>,
    pick: impl Fn(pb::event::Kind) -> Option<T>,
) -> T {
    for _ in 0..100 {
        let event = events
            .message()
            .await
            .expect("event stream")
            .expect("stream ended");
        if let Some(found) = event.kind.and_then(&pick) {
            return found;
        }
    }
    panic!("no such event among the next 100");
}

/// How many acquires wait in line, as the server reports it.
pub async fn waiting(client: &mut Client) -> u32 {
    let status = client
        .get_status(pb::GetStatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    status.waiting.iter().map(|w| w.waiters).sum()
}

/// Waits until the server reports `expected` waiters, asking at most a bounded number of times.
pub async fn until_waiting(client: &mut Client, expected: u32) {
    for _ in 0..2_000 {
        if waiting(client).await == expected {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("the server never reported {expected} waiters");
}

/// Waits for a child process to exit, within `limit`.
pub async fn exit_of(
    mut child: std::process::Child,
    limit: std::time::Duration,
) -> std::process::ExitStatus {
    tokio::task::spawn_blocking(move || {
        let (exited, exit) = std::sync::mpsc::channel();
        let pid = child.id();
        std::thread::spawn(move || exited.send(child.wait()));
        exit.recv_timeout(limit)
            .unwrap_or_else(|_| panic!("process {pid} did not finish within {limit:?}"))
            .unwrap()
    })
    .await
    .unwrap()
}
