//! `[server] tokens`, `auth` and `[tls]`: who may call and how a caller proves it, validated
//! into an [`Access`] and the TLS files.

use super::*;

/// Who may call: `server.auth`, `server.tokens` and the deprecated `server.auth_tokens`;
/// with what to tell the operator at start.
pub(super) fn access(
    server: &ServerSection,
    listen: SocketAddr,
    at: &dyn Fn(&str) -> String,
) -> Result<(Access, Vec<String>), ConfigError> {
    let mut notices = Vec::new();
    let mut callers = Vec::new();
    let mut names: HashMap<String, String> = HashMap::new();
    let mut hashes: HashMap<[u8; 32], String> = HashMap::new();
    for (index, section) in server.tokens.iter().enumerate() {
        let field = at(&format!("server.tokens[{index}]"));
        if section.token.is_some() {
            return Err(invalid(
                format!("{field}.token"),
                "tokens are never configured in clear: give sha256 = the SHA-256 of the token in hex (`keylease-server new-token` makes one and prints both)",
            ));
        }
        let name = section.name.clone().ok_or_else(|| {
            invalid(
                &field,
                "no name (who this caller is, shown in events and logs)",
            )
        })?;
        auth::check_name(&name).map_err(|reason| invalid(format!("{field}.name"), reason))?;
        let role = section.role.as_deref().ok_or_else(|| {
            invalid(
                &field,
                format!("no role (one of {})", Role::NAMES.join(", ")),
            )
        })?;
        let role = Role::parse(role).ok_or_else(|| {
            invalid(
                format!("{field}.role"),
                format!("{role:?} is not a role (one of {})", Role::NAMES.join(", ")),
            )
        })?;
        let credential = match (&section.sha256, &section.certificate) {
            (Some(hex), None) => {
                let hash = sha256_of_hex(hex).ok_or_else(|| {
                    invalid(
                        format!("{field}.sha256"),
                        "not a SHA-256 in hex (64 characters 0-9, a-f); the value is not shown",
                    )
                })?;
                if let Some(first) = hashes.insert(hash, name.clone()) {
                    return Err(invalid(
                        format!("{field}.sha256"),
                        format!("the same token as {first:?}'s"),
                    ));
                }
                Credential::Sha256(hash)
            }
            (None, Some(certificate)) => {
                auth::check_name(certificate)
                    .map_err(|reason| invalid(format!("{field}.certificate"), reason))?;
                Credential::Certificate(certificate.clone())
            }
            (Some(_), Some(_)) => {
                return Err(invalid(&field, "give sha256 or certificate, not both"));
            }
            (None, None) => {
                return Err(invalid(
                    &field,
                    "no credential: give sha256 (of a bearer token) or certificate (a client certificate's name)",
                ));
            }
        };
        if let Some(first) = names.insert(name.clone(), field.clone()) {
            return Err(invalid(
                format!("{field}.name"),
                format!("{name:?} is already the name of {first}"),
            ));
        }
        callers.push(TokenSpec {
            name,
            role,
            credential,
        });
    }
    for (index, token) in server.auth_tokens.iter().enumerate() {
        if token.0.trim().is_empty() || token.0.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(invalid(
                at(&format!("server.auth_tokens[{index}]")),
                "must be non-empty, without white space",
            ));
        }
        let name = format!("auth_tokens-{index}");
        if names.contains_key(&name) {
            return Err(invalid(
                at("server.tokens"),
                format!("{name:?} is the name the deprecated server.auth_tokens[{index}] takes"),
            ));
        }
        callers.push(TokenSpec {
            name,
            role: Role::Admin,
            credential: Credential::Clear(ApiKey::new(token.0.clone())),
        });
    }
    if !server.auth_tokens.is_empty() {
        notices.push(format!(
            "server.auth_tokens is deprecated and will be removed in the next release: its {} token(s) are admins named auth_tokens-N; configure [[server.tokens]] with a name, a role and the token's sha256 instead",
            server.auth_tokens.len()
        ));
    }
    let required = match server.auth.as_deref() {
        Some("off") if !callers.is_empty() => {
            return Err(invalid(
                at("server.auth"),
                "is \"off\" but callers are configured (server.tokens or server.auth_tokens): remove one or the other",
            ));
        }
        Some("off") => {
            notices.push(format!(
                "server.auth is \"off\": every caller on {listen} may do everything, admin calls included"
            ));
            false
        }
        Some(other) => {
            return Err(invalid(
                at("server.auth"),
                format!("{other:?} is not a setting: \"off\", or leave it out to require a token"),
            ));
        }
        None if !callers.is_empty() => true,
        None if listen.ip().is_loopback() => {
            notices.push(format!(
                "no tokens are configured: every caller on {listen} (loopback only) may do everything; configure [[server.tokens]] to require them"
            ));
            false
        }
        None => {
            return Err(invalid(
                at("server.tokens"),
                format!(
                    "none configured and server.listen ({listen}) is not a loopback address: anyone who reaches it could take keys. Configure [[server.tokens]], or set server.auth = \"off\" to run open"
                ),
            ));
        }
    };
    Ok((Access { required, callers }, notices))
}

/// `[server.tls]`, with `replication.ca`: the files exist and hold what they should.
pub(super) fn tls_files(
    file: &FileConfig,
    base_dir: &Path,
    at: &dyn Fn(&str) -> String,
) -> Result<Option<TlsFiles>, ConfigError> {
    let Some(section) = &file.server.tls else {
        if file.replication.ca.is_some() {
            return Err(invalid(
                at("replication.ca"),
                "only used with TLS: set [server.tls] too",
            ));
        }
        return Ok(None);
    };
    let (Some(certificate), Some(private_key)) = (&section.certificate, &section.private_key)
    else {
        return Err(invalid(
            at("server.tls"),
            "needs both certificate and private_key (PEM files)",
        ));
    };
    let client_certificate_required = match section.client_certificates.as_deref() {
        None | Some("optional") => false,
        Some("required") if section.client_ca.is_some() => true,
        Some("required") => {
            return Err(invalid(
                at("server.tls.client_certificates"),
                "\"required\" needs client_ca, the CAs that sign client certificates",
            ));
        }
        Some(other) => {
            return Err(invalid(
                at("server.tls.client_certificates"),
                format!("{other:?} is neither \"optional\" nor \"required\""),
            ));
        }
    };
    let files = TlsFiles {
        certificate: base_dir.join(certificate),
        private_key: base_dir.join(private_key),
        client_ca: section.client_ca.as_ref().map(|p| base_dir.join(p)),
        client_certificate_required,
        replica_ca: file.replication.ca.as_ref().map(|p| base_dir.join(p)),
    };
    crate::tls::Tls::load(files.clone())
        .map_err(|error| invalid(at("server.tls"), error.to_string()))?;
    Ok(Some(files))
}

/// 64 hexadecimal digits, as `sha256sum` prints them.
pub(super) fn sha256_of_hex(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut bytes = [0u8; 32];
    for (i, byte) in bytes.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(bytes)
}
