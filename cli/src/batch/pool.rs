//! Where the batch borrows its keys: a keylease service (`--keylease URL`, several for
//! replicas), shared with every other client of it; or, without one, keylease's own engine and
//! store run in this process, called as functions, from the configuration file and
//! `GEMINI_API_KEY_<n>` variables the server reads. In-process it keeps the server's state
//! directory (today's counts, cooldowns, disabled keys, learned limits survive a restart of the
//! batch), and the directory's lock refuses it while a server holds it. Either way the batch
//! leases through the client crate, with the same requests and answers.

use keylease::pb;
use keylease_client::{ClientConfig, KeyLeaseClient, TlsConfig};
use keylease_server::admin::ConfigSource;
use keylease_server::auth::Access;
use keylease_server::builder::{GrpcListener, LaunchError, ServerBuilder};
use keylease_server::config::{Overrides, StateLocation};
use keylease_server::secret::Redactor;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// How to reach the keys. No `Debug`: it holds the token.
#[derive(Clone, Default)]
pub struct PoolOptions {
    /// keylease endpoints; empty: in-process.
    pub endpoints: Vec<String>,
    pub token: Option<String>,
    pub ca_certificate: Option<PathBuf>,
    pub config: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub ephemeral: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The configuration names no key: nothing could be leased.
    #[error("{0}")]
    NoKeys(String),
    #[error("{0}")]
    Open(String),
    #[error("{0}")]
    Client(#[from] keylease_client::Error),
    #[error("cannot read {path}: {reason}")]
    File { path: String, reason: String },
}

/// The keys' lender, and what to stop when the batch ends.
pub struct Pool {
    pub client: KeyLeaseClient,
    /// Masks every key this process knows, and key-shaped text, in what it prints or logs.
    pub redactor: Arc<Redactor>,
    /// For people: `keylease at URL` or `in-process, state in DIR`.
    pub described: String,
    /// What the configuration said at start, for the operator.
    pub notices: Vec<String>,
    local: Option<Local>,
}

struct Local {
    stop: oneshot::Sender<()>,
    /// Ends after the state's last snapshot.
    serving: JoinHandle<Result<(), LaunchError>>,
}

impl Pool {
    pub async fn open(options: &PoolOptions) -> Result<Self, PoolError> {
        if options.endpoints.is_empty() {
            Self::in_process(options).await
        } else {
            Self::remote(options)
        }
    }

    fn remote(options: &PoolOptions) -> Result<Self, PoolError> {
        let mut config = ClientConfig::new(options.endpoints[0].clone());
        config.endpoints = options.endpoints.clone();
        config.auth_token = options.token.clone();
        if let Some(path) = &options.ca_certificate {
            let pem = std::fs::read(path).map_err(|e| PoolError::File {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
            config.tls = Some(TlsConfig {
                ca_certificate: Some(pem),
                ..TlsConfig::default()
            });
        }
        Ok(Self {
            client: KeyLeaseClient::connect(config)?,
            redactor: Arc::new(Redactor::new([])),
            described: format!("keylease at {}", options.endpoints.join(", ")),
            notices: Vec::new(),
            local: None,
        })
    }

    async fn in_process(options: &PoolOptions) -> Result<Self, PoolError> {
        let path = options.config.clone().or_else(|| {
            let default = PathBuf::from(keylease_server::config::DEFAULT_CONFIG_FILE);
            default.exists().then_some(default)
        });
        let source = ConfigSource {
            path,
            env: std::env::vars().collect(),
            overrides: Overrides {
                // Nothing listens: the engine is reached through memory only.
                listen: Some("127.0.0.1:0".into()),
                state_dir: options.state_dir.clone(),
                ephemeral: options.ephemeral,
                proxy_listen: Some("off".into()),
                ..Overrides::default()
            },
        };
        let mut settings = source.load().map_err(|e| match e {
            no_keys @ keylease_server::config::ConfigError::NoKeys { .. } => {
                PoolError::NoKeys(no_keys.to_string())
            }
            other => PoolError::Config(other.to_string()),
        })?;
        if matches!(settings.state, StateLocation::Redis(_)) {
            return Err(PoolError::Config(
                "the state is kept in Redis, by keylease replicas: run the batch against them with --keylease URL".into(),
            ));
        }
        // Only this process can connect, so callers and tokens are not asked for; the notices
        // about who may call and about ports concern a server, not the batch.
        settings.access = Access::default();
        settings.metrics_listen = None;
        settings.tls = None;
        let notices = settings
            .notices
            .iter()
            .filter(|n| !n.contains("token") && !n.contains("server.auth"))
            .cloned()
            .collect();
        let described = match &settings.state {
            StateLocation::Directory(dir) => format!("in-process, state in {}", dir.display()),
            _ => "in-process, nothing kept (--ephemeral)".to_string(),
        };
        let redactor = Arc::new(settings.redactor());
        let server = ServerBuilder::new(source, settings)
            .build(GrpcListener::InProcess)
            .await
            .map_err(|e| match e {
                LaunchError::Open(open) => PoolError::Open(open.to_string()),
                other => PoolError::Config(other.to_string()),
            })?;
        let client = server.client(ClientConfig::new("http://keylease.local"))?;
        let (stop, stopped) = oneshot::channel();
        let serving = tokio::spawn(server.serve(async {
            let _ = stopped.await;
        }));
        Ok(Self {
            client,
            redactor,
            described,
            notices,
            local: Some(Local { stop, serving }),
        })
    }

    /// The keys of `pool` (empty: the default pool, where leases come from) and `model`'s
    /// limits in every project that has one.
    pub async fn status(
        &self,
        model: &str,
        pool: &str,
    ) -> Result<pb::GetStatusResponse, PoolError> {
        let pool = if pool.is_empty() {
            keylease_engine::DEFAULT_POOL
        } else {
            pool
        };
        let mut keys = Vec::new();
        let mut page_token = String::new();
        loop {
            let mut page = self
                .client
                .status_of(pb::GetStatusRequest {
                    pool: pool.to_string(),
                    page_size: 0,
                    page_token: std::mem::take(&mut page_token),
                    model: model.to_string(),
                })
                .await?;
            keys.append(&mut page.keys);
            if page.next_page_token.is_empty() {
                page.keys = keys;
                return Ok(page);
            }
            page_token = page.next_page_token;
        }
    }

    /// Stops the in-process engine, after its last snapshot; nothing for a remote one.
    pub async fn close(self) {
        let Some(local) = self.local else { return };
        let _ = local.stop.send(());
        let _ = local.serving.await;
    }
}
