//! Certificates made on the spot for tests: no private key is ever checked in.

use std::path::{Path, PathBuf};

/// A CA, a server certificate for `localhost` and 127.0.0.1, and a client certificate per
/// name, as PEM files in `dir`.
pub struct TestPki {
    pub ca: PathBuf,
    pub server_certificate: PathBuf,
    pub server_key: PathBuf,
    /// (certificate, key) per client name.
    pub clients: Vec<(PathBuf, PathBuf)>,
}

pub fn make(dir: &Path, clients: &[&str]) -> TestPki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    std::fs::create_dir_all(dir).unwrap();
    let write = |name: &str, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "keylease test CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf = |names: Vec<String>, common_name: &str| {
        let mut params = CertificateParams::new(names).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        let key = KeyPair::generate().unwrap();
        let certificate = params.signed_by(&key, &issuer).unwrap();
        (certificate.pem(), key.serialize_pem())
    };
    let (server_pem, server_key_pem) = leaf(
        vec!["localhost".into(), "127.0.0.1".into()],
        "keylease server",
    );
    let clients = clients
        .iter()
        .map(|name| {
            let (pem, key) = leaf(vec![format!("{name}.clients.test")], name);
            (
                write(&format!("{name}.pem"), pem),
                write(&format!("{name}.key"), key),
            )
        })
        .collect();
    TestPki {
        ca: write("ca.pem", ca.pem()),
        server_certificate: write("server.pem", server_pem),
        server_key: write("server.key", server_key_pem),
        clients,
    }
}
