//! Who may call, over what: roles checked per method, TLS with the Rust client, mutual TLS
//! naming the caller in events, and the Python example over TLS with a worker token.

mod support;

use keylease::pb;
use keylease_client::{AcquireOptions, ClientConfig, Error, KeyLeaseClient, TlsConfig};
use keylease_server::auth::token_sha256;
use keylease_test_kits::pki::{TestPki, make};
use std::path::{Path, PathBuf};
use std::time::Duration;
use support::*;
use tonic::Code;

const WORKER: &str = "kl_worker-token-for-the-security-tests";
const VIEWER: &str = "kl_viewer-token-for-the-security-tests";
const ADMIN: &str = "kl_admin-token-for-the-security-tests";

fn hex(hash: [u8; 32]) -> String {
    hash.iter().map(|b| format!("{b:02x}")).collect()
}

fn tokens() -> String {
    [
        ("batch", "worker", WORKER),
        ("grafana", "viewer", VIEWER),
        ("ops", "admin", ADMIN),
    ]
    .iter()
    .map(|(name, role, token)| {
        format!(
            "[[server.tokens]]\nname = \"{name}\"\nrole = \"{role}\"\nsha256 = \"{}\"\n",
            hex(token_sha256(token))
        )
    })
    .collect()
}

fn pki_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("keylease-pki-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn tls_section(pki: &TestPki, required: bool) -> String {
    format!(
        "[server.tls]\ncertificate = {:?}\nprivate_key = {:?}\nclient_ca = {:?}\nclient_certificates = \"{}\"\n",
        pki.server_certificate,
        pki.server_key,
        pki.ca,
        if required { "required" } else { "optional" }
    )
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

fn client(server: &TestServer, token: Option<&str>, tls: Option<TlsConfig>) -> KeyLeaseClient {
    let address = match tls {
        Some(_) => server.address.replace("http://", "https://"),
        None => server.address.clone(),
    };
    KeyLeaseClient::connect(ClientConfig {
        auth_token: token.map(str::to_string),
        tls,
        attempts: 1,
        ..ClientConfig::new(address)
    })
    .unwrap()
}

fn trusting(pki: &TestPki) -> TlsConfig {
    TlsConfig {
        ca_certificate: Some(read(&pki.ca)),
        domain: Some("localhost".into()),
        ..TlsConfig::default()
    }
}

fn options(task: &str) -> AcquireOptions {
    AcquireOptions::new(task, MODEL)
}

/// A raw gRPC client over TLS with a bearer token and, optionally, a client certificate.
async fn raw_client(
    server: &TestServer,
    pki: &TestPki,
    token: Option<&str>,
    certificate: Option<usize>,
) -> Result<
    pb::key_lease_client::KeyLeaseClient<
        tonic::service::interceptor::InterceptedService<
            tonic::transport::Channel,
            impl tonic::service::Interceptor,
        >,
    >,
    tonic::transport::Error,
> {
    let mut tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(read(&pki.ca)))
        .domain_name("localhost");
    if let Some(index) = certificate {
        let (cert, key) = &pki.clients[index];
        tls = tls.identity(tonic::transport::Identity::from_pem(read(cert), read(key)));
    }
    let channel =
        tonic::transport::Endpoint::from_shared(server.address.replace("http://", "https://"))
            .unwrap()
            .tls_config(tls)?
            .connect()
            .await?;
    let header: Option<tonic::metadata::MetadataValue<_>> =
        token.map(|t| format!("Bearer {t}").parse().unwrap());
    Ok(pb::key_lease_client::KeyLeaseClient::with_interceptor(
        channel,
        move |mut request: tonic::Request<()>| {
            if let Some(header) = &header {
                request
                    .metadata_mut()
                    .insert("authorization", header.clone());
            }
            Ok(request)
        },
    ))
}

#[tokio::test]
// The deprecated SetKeyEnabled keeps working for one release, for admins only.
#[allow(deprecated)]
async fn each_role_is_refused_what_it_may_not_do() {
    let server = TestServer::start(&config_toml(&[("k1", "p1")], 100, &tokens())).await;
    let refused = |result: Result<_, Error>| match result {
        Err(Error::Refused(status)) => status.code(),
        Ok(_) => Code::Ok,
        Err(other) => panic!("{other:?}"),
    };
    assert_eq!(
        refused(
            client(&server, None, None)
                .acquire(options("a"))
                .await
                .map(drop)
        ),
        Code::Unauthenticated
    );
    assert_eq!(
        refused(
            client(&server, Some("kl_wrong"), None)
                .acquire(options("a"))
                .await
                .map(drop)
        ),
        Code::Unauthenticated
    );
    assert_eq!(
        refused(
            client(&server, Some(VIEWER), None)
                .acquire(options("a"))
                .await
                .map(drop)
        ),
        Code::PermissionDenied
    );
    let lease = client(&server, Some(WORKER), None)
        .acquire(options("a"))
        .await
        .unwrap();
    lease.release().await.unwrap();
    // Status: a viewer's, never a worker's.
    let mut raw = support::raw_with_token(&server, WORKER).await;
    let denied = raw
        .get_status(pb::GetStatusRequest::default())
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    assert!(
        denied.message().contains("batch (worker) may not call"),
        "{}",
        denied.message()
    );
    let mut raw = support::raw_with_token(&server, VIEWER).await;
    raw.get_status(pb::GetStatusRequest::default())
        .await
        .unwrap();
    let disable = pb::SetKeyEnabledRequest {
        key_id: "k1".into(),
        enabled: false,
        reason: "test".into(),
    };
    let denied = raw.set_key_enabled(disable.clone()).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let mut raw = support::raw_with_token(&server, ADMIN).await;
    raw.set_key_enabled(disable).await.unwrap();
}

#[tokio::test]
async fn the_rust_client_leases_over_tls_and_events_name_each_caller() {
    let pki = make(&pki_dir("rust"), &["worker-7"]);
    let extra = format!(
        "{}{}[[server.tokens]]\nname = \"worker-by-certificate\"\nrole = \"worker\"\ncertificate = \"worker-7.clients.test\"\n",
        tokens(),
        tls_section(&pki, false)
    );
    let server = TestServer::start(&config_toml(&[("k1", "p1")], 100, &extra)).await;

    // Plaintext to a TLS port, or TLS without the CA, gets nowhere.
    let plain = client(&server, Some(WORKER), None)
        .acquire(options("a"))
        .await;
    assert!(matches!(plain, Err(Error::Unreachable { .. })), "{plain:?}");
    let untrusting = TlsConfig {
        ca_certificate: Some(read(&make(&pki_dir("other"), &[]).ca)),
        domain: Some("localhost".into()),
        ..TlsConfig::default()
    };
    let strange = client(&server, Some(WORKER), Some(untrusting))
        .acquire(options("a"))
        .await;
    assert!(
        matches!(strange, Err(Error::Unreachable { .. })),
        "{strange:?}"
    );

    let mut viewer = raw_client(&server, &pki, Some(VIEWER), None).await.unwrap();
    let mut events = viewer
        .watch_events(pb::WatchEventsRequest {})
        .await
        .unwrap()
        .into_inner();
    let lease = client(&server, Some(WORKER), Some(trusting(&pki)))
        .acquire(options("by-token"))
        .await
        .unwrap();
    lease.release().await.unwrap();
    // A client certificate names its caller without a token.
    let mut by_certificate = raw_client(&server, &pki, None, Some(0)).await.unwrap();
    let granted = by_certificate
        .acquire_key(acquire("by-certificate"))
        .await
        .unwrap()
        .into_inner();
    by_certificate.release(release(&granted, 1)).await.unwrap();

    let mut seen = Vec::new();
    while seen.len() < 4 {
        let event = tokio::time::timeout(Duration::from_secs(10), events.message())
            .await
            .expect("events come")
            .unwrap()
            .unwrap();
        let kind = match event.kind {
            Some(pb::event::Kind::Granted(_)) => "granted",
            Some(pb::event::Kind::Released(_)) => "released",
            other => panic!("{other:?}"),
        };
        seen.push(format!("{kind} by {}", event.caller));
    }
    assert_eq!(
        seen,
        [
            "granted by batch",
            "released by batch",
            "granted by worker-by-certificate",
            "released by worker-by-certificate"
        ]
    );
    let _ = std::fs::remove_dir_all(pki_dir("rust"));
    let _ = std::fs::remove_dir_all(pki_dir("other"));
}

#[tokio::test]
async fn required_client_certificates_turn_away_a_client_without_one() {
    let pki = make(&pki_dir("required"), &["worker-1"]);
    let extra = format!("{}{}", tokens(), tls_section(&pki, true));
    let server = TestServer::start(&config_toml(&[("k1", "p1")], 100, &extra)).await;
    let without = client(&server, Some(WORKER), Some(trusting(&pki)))
        .acquire(options("a"))
        .await;
    assert!(
        matches!(without, Err(Error::Unreachable { .. })),
        "{without:?}"
    );
    let (cert, key) = &pki.clients[0];
    let with = TlsConfig {
        identity: Some((read(cert), read(key))),
        ..trusting(&pki)
    };
    let lease = client(&server, Some(WORKER), Some(with))
        .acquire(options("a"))
        .await
        .unwrap();
    lease.release().await.unwrap();
    let _ = std::fs::remove_dir_all(pki_dir("required"));
}

#[tokio::test]
async fn the_python_example_leases_over_mutual_tls_with_a_worker_token() {
    let pki = make(&pki_dir("python"), &["python-worker"]);
    let extra = format!("{}{}", tokens(), tls_section(&pki, true));
    let server = TestServer::start(&config_toml(&[("k1", "p1")], 100, &extra)).await;
    let address = server.address.replace("http://127.0.0.1", "localhost");
    let (cert, key) = &pki.clients[0];
    let path = |p: &Path| p.display().to_string();
    let fake = start_fake(&[("k1", "p1")], Default::default(), 1.0).await;
    let env = vec![
        ("GEMINI_BASE_URL", fake.base_url()),
        ("KEYLEASE_TOKEN", WORKER.to_string()),
        ("KEYLEASE_CA", path(&pki.ca)),
        ("KEYLEASE_CLIENT_CERT", path(cert)),
        ("KEYLEASE_CLIENT_KEY", path(key)),
    ];
    let stdout = run_python_example(address, env).await;
    assert!(stdout.contains("leased k1 of project p1"), "{stdout}");
    let _ = std::fs::remove_dir_all(pki_dir("python"));
}
