//! Who calls, and what they may do. A caller is known by a bearer token (configured by its
//! SHA-256, never in clear) or by the name in its TLS client certificate, and has a name and a
//! [`Role`]; every gRPC call passes [`Gate::admit`] before any service sees it. Health stays
//! open; reflection needs a known caller; each KeyLease and KeyAdmin method needs a role that
//! may call it. A replica forwards the caller it admitted in [`CALLER_HEADER`], which is trusted
//! only on a call that a replica's credential authenticates.

use keylease_core::ApiKey;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};
use tonic::Status;
use tonic::codegen::http;

/// The caller a replica forwards a call for: `ROLE NAME`.
pub const CALLER_HEADER: http::HeaderName = http::HeaderName::from_static("x-keylease-caller");
/// The name of a caller when nobody is checked (auth off).
pub const ANONYMOUS: &str = "anonymous";
/// The name the replicas' shared token authenticates as.
pub const REPLICA_NAME: &str = "replica";
/// Longest caller name: it travels in a header and shows in events and logs.
pub const MAX_NAME_BYTES: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Acquire, renew, release, report.
    Worker,
    /// Status and events: never a secret.
    Viewer,
    /// Everything, the admin service included.
    Admin,
    /// Calls between replicas, carrying the caller they forward.
    Replica,
}

impl Role {
    pub const NAMES: [&'static str; 4] = ["worker", "viewer", "admin", "replica"];

    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "worker" => Some(Self::Worker),
            "viewer" => Some(Self::Viewer),
            "admin" => Some(Self::Admin),
            "replica" => Some(Self::Replica),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Worker => "worker",
            Self::Viewer => "viewer",
            Self::Admin => "admin",
            Self::Replica => "replica",
        }
    }
}

/// Who a call is from, as [`Gate::admit`] found: in the request's extensions for the services.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub name: Arc<str>,
    pub role: Role,
    /// A replica forwarded the call on the caller's behalf.
    pub forwarded: bool,
}

/// The name of the caller the gate admitted to `request`, for the services' events and logs.
pub fn caller_name<T>(request: &tonic::Request<T>) -> Option<Arc<str>> {
    request.extensions().get::<Caller>().map(|c| c.name.clone())
}

impl Caller {
    /// The caller when nobody is checked.
    pub fn anonymous() -> Self {
        Self {
            name: ANONYMOUS.into(),
            role: Role::Admin,
            forwarded: false,
        }
    }

    /// `ROLE NAME`, as [`CALLER_HEADER`] carries it.
    pub fn header_value(&self) -> http::HeaderValue {
        let value = format!("{} {}", self.role.as_str(), self.name);
        http::HeaderValue::from_str(&value).expect("names are checked to be printable ASCII")
    }
}

/// The names a TLS client certificate was issued to (its subject's common name and its DNS
/// names): in the request's extensions when the client presented a verified one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerCertificate {
    pub names: Vec<String>,
}

/// How a configured caller proves who it is.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    /// A bearer token, by the SHA-256 of its text.
    Sha256([u8; 32]),
    /// A TLS client certificate issued to this name (common name or DNS name).
    Certificate(String),
    /// A bearer token in clear: the deprecated `server.auth_tokens`, and the replicas' token.
    Clear(ApiKey),
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Sha256(_) => write!(f, "Sha256(…)"),
            Self::Certificate(name) => write!(f, "Certificate({name:?})"),
            Self::Clear(token) => write!(f, "Clear({token:?})"),
        }
    }
}

/// One configured caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSpec {
    pub name: String,
    pub role: Role,
    pub credential: Credential,
}

/// Who may call, validated by the configuration.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Access {
    /// `false`: every call is admitted as [`Caller::anonymous`].
    pub required: bool,
    pub callers: Vec<TokenSpec>,
}

/// The SHA-256 of a token's text, as `server.tokens[].sha256` gives it.
pub fn token_sha256(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// What a call needs of its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Needs {
    Nothing,
    AnyCaller,
    OneOf(&'static [Role]),
}

const WORKERS: &[Role] = &[Role::Worker, Role::Admin];
const VIEWERS: &[Role] = &[Role::Viewer, Role::Admin];
const ADMINS: &[Role] = &[Role::Admin];

/// What the method at `path` (`/package.Service/Method`) needs. Methods of our services not
/// listed here need an admin: a method added later is closed until someone opens it.
fn needs(path: &str) -> Needs {
    let (service, method) = path
        .strip_prefix('/')
        .and_then(|p| p.split_once('/'))
        .unwrap_or(("", ""));
    match (service, method) {
        ("grpc.health.v1.Health", _) => Needs::Nothing,
        ("keylease.v1.KeyLease", "AcquireKey" | "RenewLease" | "Release" | "ReportFailure") => {
            Needs::OneOf(WORKERS)
        }
        ("keylease.v1.KeyLease", "GetStatus" | "WatchEvents") => Needs::OneOf(VIEWERS),
        ("keylease.v1.KeyLease" | "keylease.v1.KeyAdmin", _) => Needs::OneOf(ADMINS),
        // Reflection, and whatever else is served.
        _ => Needs::AnyCaller,
    }
}

/// Who may call now; replaced whole by a reload.
#[derive(Debug, Default)]
struct Authority {
    required: bool,
    /// The caller of every call when nobody is checked, made once.
    anonymous: Option<Caller>,
    by_token: HashMap<[u8; 32], Identity>,
    by_certificate: HashMap<String, Identity>,
}

#[derive(Debug, Clone)]
struct Identity {
    name: Arc<str>,
    role: Role,
}

/// The check every call passes. Cheap to share; [`Gate::replace`] swaps who may call without
/// touching calls in flight.
#[derive(Debug, Default)]
pub struct Gate {
    authority: RwLock<Arc<Authority>>,
}

impl Gate {
    /// Admits the callers of `access`, and the replicas by `replication_token`.
    pub fn new(access: &Access, replication_token: Option<&ApiKey>) -> Self {
        let gate = Self::default();
        gate.replace(access, replication_token);
        gate
    }

    /// Who may call from now on.
    pub fn replace(&self, access: &Access, replication_token: Option<&ApiKey>) {
        let mut authority = Authority {
            required: access.required,
            anonymous: Some(Caller::anonymous()),
            ..Default::default()
        };
        let replica = replication_token.map(|token| TokenSpec {
            name: REPLICA_NAME.into(),
            role: Role::Replica,
            credential: Credential::Clear(token.clone()),
        });
        for spec in access.callers.iter().chain(&replica) {
            let identity = Identity {
                name: spec.name.as_str().into(),
                role: spec.role,
            };
            match &spec.credential {
                Credential::Sha256(hash) => {
                    authority.by_token.insert(*hash, identity);
                }
                Credential::Clear(token) => {
                    authority
                        .by_token
                        .insert(token_sha256(token.reveal()), identity);
                }
                Credential::Certificate(name) => {
                    authority
                        .by_certificate
                        .insert(name.to_ascii_lowercase(), identity);
                }
            }
        }
        *self
            .authority
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(authority);
    }

    fn authority(&self) -> Arc<Authority> {
        self.authority
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Decides whether the call at `path` may go on: `Ok(Some(caller))` to serve it as that
    /// caller, `Ok(None)` for an open method (health), or the status to answer. Removes
    /// `authorization` and [`CALLER_HEADER`] from `headers`: no service sees a credential, and a
    /// forwarded caller is only what this check says it is.
    pub fn admit(
        &self,
        path: &str,
        headers: &mut http::HeaderMap,
        certificate: Option<&PeerCertificate>,
    ) -> Result<Option<Caller>, Status> {
        let presented = headers.remove(http::header::AUTHORIZATION);
        let forwarded_for = headers.remove(&CALLER_HEADER);
        let needs = needs(path);
        if needs == Needs::Nothing {
            return Ok(None);
        }
        let authority = self.authority();
        let identity = match presented.map(|value| authority.by_bearer(&value)) {
            Some(Ok(identity)) => Some(identity),
            Some(Err(refused)) if authority.required => return Err(refused),
            // Nobody is checked: a token nobody configured does not matter.
            Some(Err(_)) => None,
            None => certificate.and_then(|c| authority.by_certificate(c)),
        };
        let caller = match identity {
            Some(identity) if identity.role == Role::Replica => match forwarded_for {
                Some(value) => forwarded_caller(&value)?,
                None => Caller {
                    name: identity.name.clone(),
                    role: Role::Replica,
                    forwarded: false,
                },
            },
            Some(identity) => Caller {
                name: identity.name.clone(),
                role: identity.role,
                forwarded: false,
            },
            None if !authority.required => authority
                .anonymous
                .clone()
                .unwrap_or_else(Caller::anonymous),
            None => {
                return Err(Status::unauthenticated(
                    "authorization: a bearer token is required (`authorization: Bearer TOKEN`)",
                ));
            }
        };
        match needs {
            Needs::OneOf(roles) if !roles.contains(&caller.role) => {
                let allowed: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
                Err(Status::permission_denied(format!(
                    "{} ({}) may not call {}: it needs the role {}",
                    caller.name,
                    caller.role.as_str(),
                    path.trim_start_matches('/'),
                    allowed.join(" or ")
                )))
            }
            _ => Ok(Some(caller)),
        }
    }
}

impl Authority {
    fn by_bearer(&self, value: &http::HeaderValue) -> Result<&Identity, Status> {
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim());
        let Some(token) = token else {
            return Err(Status::unauthenticated(
                "authorization: expected `Bearer TOKEN`",
            ));
        };
        self.by_token.get(&token_sha256(token)).ok_or_else(|| {
            Status::unauthenticated("authorization: the bearer token is not accepted")
        })
    }

    fn by_certificate(&self, certificate: &PeerCertificate) -> Option<&Identity> {
        certificate
            .names
            .iter()
            .find_map(|name| self.by_certificate.get(&name.to_ascii_lowercase()))
    }
}

/// The caller a replica vouches for.
fn forwarded_caller(value: &http::HeaderValue) -> Result<Caller, Status> {
    let malformed = || Status::invalid_argument(format!("{CALLER_HEADER}: expected `ROLE NAME`"));
    let (role, name) = value
        .to_str()
        .ok()
        .and_then(|v| v.split_once(' '))
        .ok_or_else(malformed)?;
    let role = Role::parse(role)
        .filter(|r| *r != Role::Replica)
        .ok_or_else(malformed)?;
    if check_name(name).is_err() {
        return Err(malformed());
    }
    Ok(Caller {
        name: name.into(),
        role,
        forwarded: true,
    })
}

/// A caller's name: 1 to [`MAX_NAME_BYTES`] letters, digits and `._-@:`, so that it fits a
/// header and a log line as it is.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME_BYTES {
        return Err(format!("must be 1 to {MAX_NAME_BYTES} characters"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "._-@:".contains(c))
    {
        return Err("may hold only letters, digits and `._-@:`".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    const ACQUIRE: &str = "/keylease.v1.KeyLease/AcquireKey";
    const STATUS: &str = "/keylease.v1.KeyLease/GetStatus";
    const SET_ENABLED: &str = "/keylease.v1.KeyLease/SetKeyEnabled";
    const ADMIN: &str = "/keylease.v1.KeyAdmin/Reload";
    const HEALTH: &str = "/grpc.health.v1.Health/Check";
    const REFLECTION: &str = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo";

    fn spec(name: &str, role: Role, token: &str) -> TokenSpec {
        TokenSpec {
            name: name.into(),
            role,
            credential: Credential::Sha256(token_sha256(token)),
        }
    }

    fn gate() -> Gate {
        let access = Access {
            required: true,
            callers: vec![
                spec("batch", Role::Worker, "worker-token"),
                spec("grafana", Role::Viewer, "viewer-token"),
                spec("ops", Role::Admin, "admin-token"),
                TokenSpec {
                    name: "ops-laptop".into(),
                    role: Role::Admin,
                    credential: Credential::Certificate("Laptop.Example.com".into()),
                },
                TokenSpec {
                    name: "legacy".into(),
                    role: Role::Admin,
                    credential: Credential::Clear(ApiKey::new("clear-token")),
                },
            ],
        };
        Gate::new(&access, Some(&ApiKey::new("replication-token-0123")))
    }

    fn call(
        gate: &Gate,
        path: &str,
        authorization: Option<&str>,
        caller: Option<&str>,
    ) -> Result<Option<Caller>, Status> {
        let mut headers = http::HeaderMap::new();
        if let Some(value) = authorization {
            headers.insert("authorization", value.parse().unwrap());
        }
        if let Some(value) = caller {
            headers.insert(CALLER_HEADER, value.parse().unwrap());
        }
        let admitted = gate.admit(path, &mut headers, None);
        assert!(headers.is_empty(), "credentials are taken off the call");
        admitted
    }

    fn code(result: Result<Option<Caller>, Status>) -> Code {
        result.err().map_or(Code::Ok, |s| s.code())
    }

    #[test]
    fn each_role_calls_what_it_may_and_nothing_else() {
        let gate = gate();
        for (token, allowed) in [
            ("worker-token", [true, false, false, false, true]),
            ("viewer-token", [false, true, false, false, true]),
            ("admin-token", [true, true, true, true, true]),
        ] {
            for (path, allowed) in [ACQUIRE, STATUS, SET_ENABLED, ADMIN, REFLECTION]
                .into_iter()
                .zip(allowed)
            {
                let expected = if allowed {
                    Code::Ok
                } else {
                    Code::PermissionDenied
                };
                let result = call(&gate, path, Some(&format!("Bearer {token}")), None);
                assert_eq!(code(result), expected, "{token} on {path}");
            }
        }
        let worker = call(&gate, ACQUIRE, Some("Bearer worker-token"), None).unwrap();
        assert_eq!(worker.unwrap().name.as_ref(), "batch");
        let denied = call(&gate, STATUS, Some("Bearer worker-token"), None).unwrap_err();
        assert_eq!(
            denied.message(),
            "batch (worker) may not call keylease.v1.KeyLease/GetStatus: it needs the role viewer or admin"
        );
    }

    #[test]
    fn a_missing_or_wrong_token_is_unauthenticated_and_health_stays_open() {
        let gate = gate();
        for authorization in [
            None,
            Some("Bearer nope"),
            Some("Basic d29ya2VyLXRva2Vu"),
            Some("worker-token"),
        ] {
            let result = call(&gate, ACQUIRE, authorization, None);
            assert_eq!(code(result), Code::Unauthenticated, "{authorization:?}");
            assert_eq!(
                code(call(&gate, REFLECTION, authorization, None)),
                Code::Unauthenticated
            );
            assert_eq!(call(&gate, HEALTH, authorization, None).unwrap(), None);
        }
    }

    #[test]
    fn bearer_is_matched_whatever_its_case_and_clear_tokens_still_work() {
        let gate = gate();
        for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
            let value = format!("{scheme} worker-token");
            assert_eq!(code(call(&gate, ACQUIRE, Some(&value), None)), Code::Ok);
        }
        let legacy = call(&gate, SET_ENABLED, Some("Bearer clear-token"), None).unwrap();
        assert_eq!(legacy.unwrap().role, Role::Admin);
    }

    #[test]
    fn a_forwarded_caller_is_trusted_only_from_a_replica() {
        let gate = gate();
        let forwarded = call(
            &gate,
            ACQUIRE,
            Some("Bearer replication-token-0123"),
            Some("worker batch"),
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            forwarded,
            Caller {
                name: "batch".into(),
                role: Role::Worker,
                forwarded: true
            }
        );
        // A forwarded worker is still a worker.
        let result = call(
            &gate,
            ADMIN,
            Some("Bearer replication-token-0123"),
            Some("worker batch"),
        );
        assert_eq!(code(result), Code::PermissionDenied);
        // A worker cannot pass itself off as an admin.
        let claimed = call(
            &gate,
            ACQUIRE,
            Some("Bearer worker-token"),
            Some("admin ops"),
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            (claimed.name.as_ref(), claimed.role),
            ("batch", Role::Worker)
        );
        for malformed in ["replica x", "admin", "root ops", "admin two words"] {
            let result = call(
                &gate,
                ACQUIRE,
                Some("Bearer replication-token-0123"),
                Some(malformed),
            );
            assert_eq!(code(result), Code::InvalidArgument, "{malformed}");
        }
        // The replica itself may call only what any caller may.
        let replica = call(&gate, ACQUIRE, Some("Bearer replication-token-0123"), None);
        assert_eq!(code(replica), Code::PermissionDenied);
    }

    #[test]
    fn a_client_certificate_names_its_caller_and_a_token_takes_precedence() {
        let gate = gate();
        let certificate = PeerCertificate {
            names: vec!["other".into(), "laptop.example.COM".into()],
        };
        let mut headers = http::HeaderMap::new();
        let caller = gate.admit(ADMIN, &mut headers, Some(&certificate)).unwrap();
        assert_eq!(caller.unwrap().name.as_ref(), "ops-laptop");
        headers.insert("authorization", "Bearer viewer-token".parse().unwrap());
        let caller = gate
            .admit(STATUS, &mut headers, Some(&certificate))
            .unwrap();
        assert_eq!(caller.unwrap().name.as_ref(), "grafana");
        let unknown = PeerCertificate {
            names: vec!["stranger".into()],
        };
        let refused = gate.admit(STATUS, &mut http::HeaderMap::new(), Some(&unknown));
        assert_eq!(code(refused), Code::Unauthenticated);
    }

    #[test]
    fn without_auth_every_call_is_anonymous_and_a_reload_changes_who_may_call() {
        let gate = Gate::new(
            &Access::default(),
            Some(&ApiKey::new("replication-token-0123")),
        );
        for token in [None, Some("Bearer anything")] {
            let caller = call(&gate, ADMIN, token, None).unwrap().unwrap();
            assert_eq!(caller, Caller::anonymous());
        }
        // Replicas still tell a forwarded call from a client's.
        let forwarded = call(
            &gate,
            ACQUIRE,
            Some("Bearer replication-token-0123"),
            Some("admin anonymous"),
        );
        assert!(forwarded.unwrap().unwrap().forwarded);
        gate.replace(
            &Access {
                required: true,
                callers: vec![spec("batch", Role::Worker, "worker-token")],
            },
            None,
        );
        assert_eq!(
            code(call(&gate, ACQUIRE, None, None)),
            Code::Unauthenticated
        );
        assert_eq!(
            code(call(
                &gate,
                ACQUIRE,
                Some("Bearer replication-token-0123"),
                None
            )),
            Code::Unauthenticated
        );
        assert_eq!(
            code(call(&gate, ACQUIRE, Some("Bearer worker-token"), None)),
            Code::Ok
        );
    }
}
