//! The host config file (`natsfn.toml` given with `--config`): the tenants a
//! host serves, how each connects to NATS, and the limits that fence it.
//!
//! ```toml
//! nats = "nats://127.0.0.1:4222"   # URL for tenants that name none
//! max_instances = 256               # instance pool of the whole host
//! handlers = ["handlers"]          # handler directories, relative to this file
//!
//! [tenants.acme]
//! url = "tls://nats.example.com:4222"
//! user = "acme"
//! password = { env = "ACME_PASSWORD" }     # or { file = "..." } or a literal
//! # token = { file = "/run/secrets/acme" } # or one of these instead
//! # nkey = { file = "acme.nk" }           # an nkey seed
//! # creds = "acme.creds"                  # a JWT + seed file
//! threads = 1                              # threads acme's guests run on
//! buckets = ["kv:carts", "object:images"]  # created in acme's account
//! tls = { ca = "ca.pem", cert = "acme.pem", key = "acme-key.pem", required = true }
//!
//! [tenants.acme.limits]
//! memory_mb = 512          # all of acme's live instances together
//! max_instances = 32       # acme's concurrent invocations
//! max_handlers = 20
//! max_payload_bytes = 1048576   # per publish/request/put host call
//! publish_rate = 1000      # host-call sends per second (burst = publish_burst)
//! timeout_ms = 10000       # ceiling for a handler's limits.timeout_ms
//! fuel = 1000000000        # wasm fuel per invocation (deterministic CPU cap)
//! log_rate = 200           # guest log lines per second; the rest are dropped
//! ```
//!
//! Like manifests, the file is read in two steps: serde into `Raw*` structs
//! (unknown fields rejected), then checks that name the field at fault
//! (`tenants.acme.limits.memory_mb`). Secrets are *not* read here: a missing
//! variable or file is a problem of that one tenant when it connects, so the
//! other tenants still start.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::buckets::{BucketKind, BucketSpec};
use crate::manifest::TenantId;

/// A host config that cannot be used, with the file and field at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        /// The config file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// Not TOML, or not the config's shape.
    #[error("{}: {message}", path.display())]
    Syntax {
        /// The config file.
        path: PathBuf,
        /// The parser's explanation, with line and column.
        message: String,
    },
    /// A field has a value the host cannot accept.
    #[error("{}: {field}: {problem}", path.display())]
    Field {
        /// The config file.
        path: PathBuf,
        /// The field, as a TOML path such as `tenants.acme.limits.memory_mb`.
        field: String,
        /// What is wrong with it.
        problem: String,
    },
}

/// Where a secret comes from. The value itself is only read when the tenant
/// connects, and never printed: `Debug` shows the source, not the value.
#[derive(Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// Written in the config file itself.
    Literal(String),
    /// An environment variable.
    Env(String),
    /// A file (trailing newlines are ignored).
    File(PathBuf),
}

impl fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretSource::Literal(_) => f.write_str("Literal(<redacted>)"),
            SecretSource::Env(var) => write!(f, "Env({var})"),
            SecretSource::File(path) => write!(f, "File({})", path.display()),
        }
    }
}

/// A secret value, read from its source. Never shown in `Debug` output.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    /// The value, for handing to the NATS client.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl SecretSource {
    /// Reads the secret. The error says where it looked, never what it found.
    pub fn resolve(&self) -> Result<Secret, String> {
        match self {
            SecretSource::Literal(s) => Ok(Secret(s.clone())),
            SecretSource::Env(var) => match std::env::var(var) {
                Ok(v) if !v.is_empty() => Ok(Secret(v)),
                Ok(_) => Err(format!("environment variable {var} is empty")),
                Err(_) => Err(format!("environment variable {var} is not set")),
            },
            SecretSource::File(path) => match std::fs::read_to_string(path) {
                Ok(v) => {
                    let v = v.trim_end_matches(['\n', '\r']).to_owned();
                    if v.is_empty() {
                        Err(format!("{} is empty", path.display()))
                    } else {
                        Ok(Secret(v))
                    }
                }
                Err(e) => Err(format!("cannot read {}: {e}", path.display())),
            },
        }
    }
}

/// How a tenant proves who it is to the NATS server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    /// No credentials (a server without auth, or TLS-mapped certificates).
    None,
    /// `user` and `password`.
    UserPassword {
        /// The user name.
        user: String,
        /// The password.
        password: SecretSource,
    },
    /// A token.
    Token(SecretSource),
    /// An nkey seed (`SU...`).
    NKey(SecretSource),
    /// A `.creds` file: a user JWT and its nkey seed.
    Creds(PathBuf),
}

/// TLS settings of a tenant's connection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tls {
    /// Extra root certificates (PEM) to trust for the server.
    pub ca: Option<PathBuf>,
    /// Client certificate and key (PEM), for servers that verify clients.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// Refuse to connect without TLS.
    pub required: bool,
}

/// How many publishes a tenant's guests may make per second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Sustained sends per second.
    pub per_second: u32,
    /// Sends allowed at once after a quiet spell.
    pub burst: u32,
}

/// Limits of one tenant. `None` means the host imposes no tenant-wide cap
/// on that resource (the per-handler limits still apply).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TenantLimits {
    /// Linear memory of all the tenant's live instances together, in bytes.
    pub memory_bytes: Option<usize>,
    /// Invocations of the tenant's handlers running at once.
    pub max_instances: Option<u32>,
    /// Handlers the tenant may have loaded.
    pub max_handlers: Option<u32>,
    /// Largest payload one host call may send or store, in bytes.
    pub max_payload: Option<usize>,
    /// Host-call sends (publish, request, JetStream publish) per second.
    pub publish_rate: Option<Rate>,
    /// Ceiling for a handler's `limits.timeout_ms`.
    pub max_timeout: Option<Duration>,
    /// Fuel each invocation gets: a deterministic bound on wasm instructions.
    pub fuel: Option<u64>,
    /// Guest log lines (log interface, stdout and stderr) per second; the
    /// rest are dropped and counted.
    pub log_rate: Option<Rate>,
}

/// One tenant as the config declares it.
#[derive(Debug, Clone)]
pub struct TenantConfig {
    /// The tenant's id, matched against manifests' `tenant`.
    pub id: TenantId,
    /// Server URL; the host's URL when `None`.
    pub url: Option<String>,
    /// Credentials.
    pub auth: Auth,
    /// TLS options.
    pub tls: Tls,
    /// Threads the tenant's guests run on; `None` shares the host's.
    pub threads: Option<usize>,
    /// Buckets created in the tenant's account at start-up.
    pub buckets: Vec<BucketSpec>,
    /// Tenant-wide limits.
    pub limits: TenantLimits,
}

impl TenantConfig {
    /// A tenant with no credentials, no TLS and no limits, on the host's
    /// server and threads: the implicit `default` tenant.
    pub fn open(id: TenantId) -> Self {
        TenantConfig {
            id,
            url: None,
            auth: Auth::None,
            tls: Tls::default(),
            threads: None,
            buckets: Vec::new(),
            limits: TenantLimits::default(),
        }
    }
}

/// A parsed host config file.
#[derive(Debug, Clone, Default)]
pub struct HostConfig {
    /// The file it came from.
    pub origin: PathBuf,
    /// Default NATS URL.
    pub nats: Option<String>,
    /// Size of the host's instance pool.
    pub max_instances: Option<u32>,
    /// Handler directories (absolute, or relative to the working directory).
    pub handlers: Vec<PathBuf>,
    /// Declared tenants, by id.
    pub tenants: Vec<TenantConfig>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    nats: Option<String>,
    max_instances: Option<u32>,
    #[serde(default)]
    handlers: Vec<String>,
    #[serde(default)]
    tenants: BTreeMap<String, RawTenant>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTenant {
    url: Option<String>,
    user: Option<String>,
    password: Option<RawSecret>,
    token: Option<RawSecret>,
    nkey: Option<RawSecret>,
    creds: Option<String>,
    tls: Option<RawTls>,
    threads: Option<usize>,
    #[serde(default)]
    buckets: Vec<String>,
    #[serde(default)]
    limits: RawTenantLimits,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawSecret {
    Literal(String),
    From(RawSecretSource),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSecretSource {
    env: Option<String>,
    file: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    ca: Option<String>,
    cert: Option<String>,
    key: Option<String>,
    #[serde(default)]
    required: bool,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTenantLimits {
    memory_mb: Option<u32>,
    max_instances: Option<u32>,
    max_handlers: Option<u32>,
    max_payload_bytes: Option<usize>,
    publish_rate: Option<u32>,
    publish_burst: Option<u32>,
    timeout_ms: Option<u64>,
    fuel: Option<u64>,
    log_rate: Option<u32>,
}

/// Most threads a tenant may ask for: more would only oversubscribe the
/// machine and defeat the point of fencing tenants' CPU.
const MAX_TENANT_THREADS: usize = 64;

/// Threads a declared tenant's guests run on when the config says nothing:
/// one, so a tenant's CPU-bound guests can take at most one core from the
/// others. Raise it for tenants that need throughput.
pub const DEFAULT_TENANT_THREADS: usize = 1;

/// Concurrent instances a declared tenant gets when the config says
/// nothing. Every tenant has a share, so the host pool (sized to hold all
/// shares) is never something one tenant can fill.
pub const DEFAULT_TENANT_MAX_INSTANCES: u32 = crate::limits::DEFAULT_MAX_CONCURRENCY;

/// Guest log lines per second a declared tenant may write when the config
/// says nothing: plenty for debugging, too few to flood the host's log.
pub const DEFAULT_TENANT_LOG_RATE: u32 = 200;

impl HostConfig {
    /// Reads and checks the config file at `path`.
    pub fn load(path: &Path) -> Result<HostConfig, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        HostConfig::from_toml(&text, path)
    }

    /// Parses config text; `origin` names it in errors and anchors relative
    /// paths.
    pub fn from_toml(text: &str, origin: &Path) -> Result<HostConfig, ConfigError> {
        let raw: RawConfig = toml::from_str(text)
            .map_err(|e| ConfigError::Syntax { path: origin.to_owned(), message: e.to_string() })?;
        let base = origin.parent().unwrap_or(Path::new(".")).to_owned();
        let err = |field: String, problem: String| ConfigError::Field { path: origin.to_owned(), field, problem };
        if raw.max_instances == Some(0) {
            return Err(err("max_instances".into(), "must be at least 1".into()));
        }
        let mut tenants = Vec::new();
        for (name, t) in raw.tenants {
            let at = |field: &str| format!("tenants.{name}{field}");
            let id: TenantId = name.parse().map_err(|p| err(at(""), format!("tenant name {p}")))?;
            let tenant = resolve_tenant(id, t, &base).map_err(|(field, problem)| err(at(&field), problem))?;
            tenants.push(tenant);
        }
        if let Some(pool) = raw.max_instances {
            let claimed: u64 = tenants.iter().filter_map(|t| t.limits.max_instances).map(u64::from).sum();
            if claimed > u64::from(pool) {
                return Err(err(
                    "max_instances".into(),
                    format!("{pool} is less than the {claimed} instances the tenants' limits.max_instances add up to; one tenant could then take instances promised to another"),
                ));
            }
        }
        Ok(HostConfig {
            origin: origin.to_owned(),
            nats: raw.nats,
            max_instances: raw.max_instances,
            handlers: raw.handlers.iter().map(|h| base.join(h)).collect(),
            tenants,
        })
    }
}

/// Checks one tenant's table; errors carry the field below `tenants.<id>`.
fn resolve_tenant(id: TenantId, t: RawTenant, base: &Path) -> Result<TenantConfig, (String, String)> {
    let secret = |field: &str, s: RawSecret| -> Result<SecretSource, (String, String)> {
        match s {
            RawSecret::Literal(v) if v.is_empty() => Err((format!(".{field}"), "must not be empty".into())),
            RawSecret::Literal(v) => Ok(SecretSource::Literal(v)),
            RawSecret::From(RawSecretSource { env: Some(var), file: None }) => Ok(SecretSource::Env(var)),
            RawSecret::From(RawSecretSource { env: None, file: Some(f) }) => Ok(SecretSource::File(base.join(f))),
            RawSecret::From(_) => Err((format!(".{field}"), "give exactly one of `env` or `file`".into())),
        }
    };
    let auth = match (t.user, t.password, t.token, t.nkey, t.creds) {
        (None, None, None, None, None) => Auth::None,
        (Some(user), Some(password), None, None, None) => {
            Auth::UserPassword { user, password: secret("password", password)? }
        }
        (Some(_), None, _, _, _) => return Err((".password".into(), "`user` needs a `password`".into())),
        (None, Some(_), _, _, _) => return Err((".user".into(), "`password` needs a `user`".into())),
        (None, None, Some(token), None, None) => Auth::Token(secret("token", token)?),
        (None, None, None, Some(seed), None) => Auth::NKey(secret("nkey", seed)?),
        (None, None, None, None, Some(creds)) => Auth::Creds(base.join(creds)),
        _ => return Err((String::new(), "give one way to authenticate: user + password, token, nkey or creds".into())),
    };
    let tls = match t.tls {
        None => Tls::default(),
        Some(raw) => {
            let client_cert = match (raw.cert, raw.key) {
                (Some(c), Some(k)) => Some((base.join(c), base.join(k))),
                (None, None) => None,
                (Some(_), None) => return Err((".tls.key".into(), "`cert` needs its `key`".into())),
                (None, Some(_)) => return Err((".tls.cert".into(), "`key` needs its `cert`".into())),
            };
            Tls { ca: raw.ca.map(|c| base.join(c)), client_cert, required: raw.required }
        }
    };
    let threads = t.threads.unwrap_or(DEFAULT_TENANT_THREADS);
    if !(1..=MAX_TENANT_THREADS).contains(&threads) {
        return Err((".threads".into(), format!("{threads} is outside 1..={MAX_TENANT_THREADS}")));
    }
    let mut buckets = Vec::new();
    for (i, b) in t.buckets.iter().enumerate() {
        let (kind, spec) = match b.split_once(':') {
            Some(("kv", spec)) => (BucketKind::Kv, spec),
            Some(("object", spec)) => (BucketKind::Object, spec),
            _ => return Err((format!(".buckets[{i}]"), format!("`{b}` is not `kv:NAME[:options]` or `object:NAME`"))),
        };
        buckets.push(BucketSpec::parse(kind, spec).map_err(|p| (format!(".buckets[{i}]"), p))?);
    }
    let limits = resolve_limits(&t.limits).map_err(|(field, p)| (format!(".limits.{field}"), p))?;
    Ok(TenantConfig { id, url: t.url, auth, tls, threads: Some(threads), buckets, limits })
}

fn resolve_limits(raw: &RawTenantLimits) -> Result<TenantLimits, (&'static str, String)> {
    let at_least_one = |field: &'static str, v: Option<u32>| match v {
        Some(0) => Err((field, "must be at least 1".to_owned())),
        v => Ok(v),
    };
    let memory_mb = at_least_one("memory_mb", raw.memory_mb)?;
    if raw.publish_burst.is_some() && raw.publish_rate.is_none() {
        return Err(("publish_burst", "needs publish_rate".into()));
    }
    let publish_rate = match at_least_one("publish_rate", raw.publish_rate)? {
        Some(per_second) => {
            let burst = at_least_one("publish_burst", raw.publish_burst)?.unwrap_or(per_second);
            Some(Rate { per_second, burst })
        }
        None => None,
    };
    let max_timeout = match raw.timeout_ms {
        Some(0) => return Err(("timeout_ms", "must be at least 1".into())),
        other => other.map(Duration::from_millis),
    };
    if raw.max_payload_bytes == Some(0) {
        return Err(("max_payload_bytes", "must be at least 1".into()));
    }
    if raw.fuel == Some(0) {
        return Err(("fuel", "must be at least 1".into()));
    }
    Ok(TenantLimits {
        memory_bytes: memory_mb.map(|mb| mb as usize * 1024 * 1024),
        max_instances: Some(at_least_one("max_instances", raw.max_instances)?.unwrap_or(DEFAULT_TENANT_MAX_INSTANCES)),
        max_handlers: at_least_one("max_handlers", raw.max_handlers)?,
        max_payload: raw.max_payload_bytes,
        publish_rate,
        max_timeout,
        fuel: raw.fuel,
        log_rate: at_least_one("log_rate", raw.log_rate)?
            .or(Some(DEFAULT_TENANT_LOG_RATE))
            .map(|per_second| Rate { per_second, burst: per_second }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<HostConfig, String> {
        HostConfig::from_toml(text, Path::new("/etc/natsfn/natsfn.toml")).map_err(|e| e.to_string())
    }

    #[test]
    fn a_full_tenant_parses_with_paths_relative_to_the_file() {
        let c = parse(
            r#"
            nats = "nats://a:4222"
            max_instances = 64
            handlers = ["h"]
            [tenants.acme]
            user = "acme"
            password = { env = "ACME_PW" }
            threads = 2
            buckets = ["kv:carts:history=3", "object:images"]
            tls = { ca = "ca.pem", cert = "c.pem", key = "k.pem", required = true }
            [tenants.acme.limits]
            memory_mb = 256
            max_instances = 8
            publish_rate = 100
            timeout_ms = 2000
            fuel = 5000
            [tenants.beta]
            creds = "beta.creds"
            "#,
        )
        .unwrap();
        let beta = &c.tenants[1];
        assert_eq!(beta.threads, Some(DEFAULT_TENANT_THREADS));
        assert_eq!(beta.limits.max_instances, Some(DEFAULT_TENANT_MAX_INSTANCES));
        assert_eq!(c.handlers, vec![PathBuf::from("/etc/natsfn/h")]);
        let acme = &c.tenants[0];
        assert_eq!(acme.id.as_str(), "acme");
        assert_eq!(
            acme.auth,
            Auth::UserPassword { user: "acme".into(), password: SecretSource::Env("ACME_PW".into()) }
        );
        assert_eq!(acme.tls.ca, Some(PathBuf::from("/etc/natsfn/ca.pem")));
        assert!(acme.tls.required);
        assert_eq!(acme.buckets.len(), 2);
        assert_eq!(acme.limits.memory_bytes, Some(256 << 20));
        assert_eq!(acme.limits.publish_rate, Some(Rate { per_second: 100, burst: 100 }));
        assert_eq!(acme.limits.fuel, Some(5000));
        assert_eq!(c.tenants[1].auth, Auth::Creds(PathBuf::from("/etc/natsfn/beta.creds")));
    }

    #[test]
    fn bad_values_name_the_field() {
        let cases = [
            ("[tenants.a]\nuser = \"x\"\n", "tenants.a.password: "),
            ("[tenants.a]\ntoken = \"t\"\nnkey = \"n\"\n", "tenants.a: give one way"),
            ("[tenants.a]\ntoken = { env = \"A\", file = \"b\" }\n", "tenants.a.token: "),
            ("[tenants.a]\ntls = { cert = \"c\" }\n", "tenants.a.tls.key: "),
            ("[tenants.a.limits]\nmemory_mb = 0\n", "tenants.a.limits.memory_mb: "),
            ("[tenants.a.limits]\npublish_burst = 5\n", "tenants.a.limits.publish_burst: "),
            ("[tenants.a]\nbuckets = [\"carts\"]\n", "tenants.a.buckets[0]: "),
            ("[tenants.a]\nthreads = 0\n", "tenants.a.threads: "),
            ("[tenants.\"a b\"]\n", "tenants.a b: tenant name"),
            (
                "max_instances = 4\n[tenants.a.limits]\nmax_instances = 3\n[tenants.b.limits]\nmax_instances = 2\n",
                "max_instances: 4 is less than the 5",
            ),
        ];
        for (text, want) in cases {
            let e = parse(text).unwrap_err();
            assert!(e.starts_with("/etc/natsfn/natsfn.toml: "), "{e}");
            assert!(e.contains(want), "{text:?}: {e}");
        }
        assert!(parse("[tenants.a]\npasword = \"x\"\n").unwrap_err().contains("pasword"));
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        let c = parse("[tenants.a]\nuser = \"u\"\npassword = \"hunter2\"\n").unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
        let s = SecretSource::Literal("hunter2".into()).resolve().unwrap();
        assert!(!format!("{s:?}").contains("hunter2"));
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn secrets_come_from_env_and_files_and_missing_ones_say_where() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "s3cret\n").unwrap();
        assert_eq!(SecretSource::File(file.clone()).resolve().unwrap().expose(), "s3cret");
        let e = SecretSource::File(dir.path().join("nope")).resolve().unwrap_err();
        assert!(e.contains("nope"), "{e}");
        let e = SecretSource::Env("NATSFN_TEST_SURELY_UNSET".into()).resolve().unwrap_err();
        assert_eq!(e, "environment variable NATSFN_TEST_SURELY_UNSET is not set");
    }
}
