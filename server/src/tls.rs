//! TLS on the gRPC port (rustls): the server's certificate chain and private key, and, for
//! mutual TLS, the CAs whose client certificates it accepts, all read from PEM files. A reload
//! reads them again, so renewed certificates serve new connections without a restart while
//! open ones carry on. Errors name the file and what is wrong with it, never its content. The
//! same files let a follower replica reach its leader over TLS (see [`Tls::connector`]).

use crate::auth::PeerCertificate;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use tokio_rustls::rustls::crypto::{CryptoProvider, aws_lc_rs};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// gRPC is HTTP/2, the only protocol offered.
const ALPN_H2: &[u8] = b"h2";

/// Where the PEM files are, as configured (`[server.tls]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The server's certificate, then its intermediates.
    pub certificate: PathBuf,
    pub private_key: PathBuf,
    /// CAs whose client certificates are accepted: mutual TLS.
    pub client_ca: Option<PathBuf>,
    /// Every client must present a certificate the CAs signed (else one is optional and a
    /// token does instead).
    pub client_certificate_required: bool,
    /// CAs that signed the other replicas' certificates, trusted when forwarding to a leader.
    pub replica_ca: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TlsError {
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
    #[error("TLS: {0}")]
    Setup(String),
}

fn file_error(path: &Path, reason: impl Into<String>) -> TlsError {
    TlsError::File {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

/// What was read from the files: a server configuration and, for replicas, a client one.
struct Loaded {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

/// TLS as it serves now; [`Tls::reload`] swaps in what the files hold then.
pub struct Tls {
    files: TlsFiles,
    loaded: RwLock<Arc<Loaded>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("files", &self.files).finish()
    }
}

impl Tls {
    /// Reads the files, or says which one is wrong and how.
    pub fn load(files: TlsFiles) -> Result<Self, TlsError> {
        let loaded = load(&files)?;
        Ok(Self {
            files,
            loaded: RwLock::new(Arc::new(loaded)),
        })
    }

    /// Reads the files again; on an error, what was loaded before stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let loaded = load(&self.files)?;
        *self.loaded.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(loaded);
        Ok(())
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    fn loaded(&self) -> Arc<Loaded> {
        self.loaded
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Accepts connections with the certificate loaded now.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.loaded().server.clone())
    }

    /// Connects to another replica: trusts `replica_ca` (or the client CAs, or the server's own
    /// chain), and presents this server's certificate for a leader that requires one.
    pub fn connector(&self) -> TlsConnector {
        TlsConnector::from(self.loaded().client.clone())
    }
}

/// The name to check a replica's certificate against: the host of its `HOST:PORT`.
pub fn server_name(address: &str) -> Result<ServerName<'static>, String> {
    let host = address
        .rsplit_once(':')
        .map_or(address, |(host, _)| host)
        .trim_start_matches('[')
        .trim_end_matches(']');
    ServerName::try_from(host.to_string()).map_err(|e| format!("{host:?}: {e}"))
}

/// The names a verified client certificate was issued to: its DNS names and common name.
pub fn peer_certificate(connection: &rustls::ServerConnection) -> Option<PeerCertificate> {
    let leaf = connection.peer_certificates()?.first()?;
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    let mut names = Vec::new();
    if let Ok(Some(alternatives)) = parsed.subject_alternative_name() {
        for name in &alternatives.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(dns) = name {
                names.push(dns.to_string());
            }
        }
    }
    for common_name in parsed.subject().iter_common_name() {
        if let Ok(name) = common_name.as_str() {
            names.push(name.to_string());
        }
    }
    Some(PeerCertificate { names })
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(aws_lc_rs::default_provider())
}

fn load(files: &TlsFiles) -> Result<Loaded, TlsError> {
    let chain = certificates(&files.certificate)?;
    let key = PrivateKeyDer::from_pem_file(&files.private_key).map_err(|e| {
        file_error(
            &files.private_key,
            format!(
                "no PEM private key (PKCS#8, PKCS#1 or SEC1) could be read: {}",
                pem_reason(&e)
            ),
        )
    })?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Setup(e.to_string()))?;
    let client_roots = files.client_ca.as_deref().map(roots).transpose()?;
    let builder = match &client_roots {
        None => builder.with_no_client_auth(),
        Some(roots) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider());
            let verifier = if files.client_certificate_required {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            let verifier = verifier.build().map_err(|e| {
                file_error(
                    files.client_ca.as_deref().unwrap_or(Path::new("")),
                    format!("cannot verify clients with these CAs: {e}"),
                )
            })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut server = builder
        .with_single_cert(chain.clone(), key.clone_key())
        .map_err(|e| {
            file_error(
                &files.private_key,
                format!(
                    "does not go with the certificate in {}: {e}",
                    files.certificate.display()
                ),
            )
        })?;
    server.alpn_protocols = vec![ALPN_H2.to_vec()];

    let replica_roots = match (&files.replica_ca, client_roots) {
        (Some(path), _) => roots(path)?,
        (None, Some(roots)) => roots,
        (None, None) => {
            let mut roots = RootCertStore::empty();
            for certificate in &chain {
                let _ = roots.add(certificate.clone());
            }
            Arc::new(roots)
        }
    };
    let mut client = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Setup(e.to_string()))?
        .with_root_certificates(replica_roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| TlsError::Setup(format!("this server's certificate as a client's: {e}")))?;
    client.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Loaded {
        server: Arc::new(server),
        client: Arc::new(client),
    })
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let iter = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(path, format!("cannot read: {}", pem_reason(&e))))?;
    let chain: Vec<CertificateDer<'static>> = iter
        .collect::<Result<_, _>>()
        .map_err(|e| file_error(path, format!("not PEM certificates: {}", pem_reason(&e))))?;
    if chain.is_empty() {
        return Err(file_error(
            path,
            "no certificate in it (expected -----BEGIN CERTIFICATE----- blocks)",
        ));
    }
    Ok(chain)
}

fn roots(path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for certificate in certificates(path)? {
        roots
            .add(certificate)
            .map_err(|e| file_error(path, format!("not a CA certificate: {e}")))?;
    }
    Ok(Arc::new(roots))
}

/// What went wrong reading a PEM file, without quoting it (a key file holds a secret).
fn pem_reason(error: &rustls_pki_types::pem::Error) -> String {
    use rustls_pki_types::pem::Error;
    match error {
        Error::Io(io) => io.to_string(),
        Error::NoItemsFound => "nothing of that kind in it".into(),
        Error::MissingSectionEnd { .. } => "a section has no END line".into(),
        Error::IllegalSectionStart { .. } => "a malformed BEGIN line".into(),
        Error::Base64Decode(_) => "a section is not valid base64".into(),
        _ => "malformed PEM".into(),
    }
}
