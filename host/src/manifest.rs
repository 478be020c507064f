//! Handler manifests: the TOML file beside a `.wasm` that says what a handler
//! is called, which tenant owns it, what triggers it, what it may do and with
//! which limits, and whether its instances may be reused across messages
//! (`instance = "reuse"`, see [`InstanceMode`]; fresh per message otherwise).
//!
//! Parsing is two steps. Serde reads the file into `Raw*` structs that mirror
//! the TOML (unknown fields are rejected there), then `Manifest::from_raw`
//! checks every value and turns strings into types, naming the file and the
//! field (`trigger[1].subject`) of the first problem it finds. Nothing past
//! this module sees an unchecked manifest.
//!
//! A handlers directory holds `<name>.toml` manifests next to their
//! components, and folders with a `natsfn.toml` inside: [`discover`] finds
//! both, and reports duplicate handler names against the file that claimed
//! the name first.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

use crate::limits::{self, Limits};
use crate::permissions::{Access, Permissions};
use crate::subject::{Subject, SubjectPattern};

/// A manifest that cannot be used, with the file and field at fault.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The file could not be read.
    #[error("{path}: cannot read: {source}")]
    Read {
        /// The manifest file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not have the manifest's shape
    /// (unknown or missing fields, wrong types).
    #[error("{path}: {message}")]
    Syntax {
        /// The manifest file.
        path: PathBuf,
        /// The TOML parser's explanation, with line and column.
        message: String,
    },
    /// A field has a value the host cannot accept.
    #[error("{path}: {field}: {problem}")]
    Field {
        /// The manifest file.
        path: PathBuf,
        /// The field, as a TOML path such as `trigger[0].subject`.
        field: String,
        /// What is wrong with its value.
        problem: String,
    },
    /// Two manifests declare the same handler for the same tenant.
    #[error("{path}: name: handler `{name}` of tenant `{tenant}` is already defined by {first}")]
    Duplicate {
        /// The manifest that came second (and is skipped).
        path: PathBuf,
        /// The handler name both declare.
        name: HandlerName,
        /// The tenant both belong to.
        tenant: TenantId,
        /// The manifest that keeps the name.
        first: PathBuf,
    },
}

impl ManifestError {
    /// The manifest file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            ManifestError::Read { path, .. }
            | ManifestError::Syntax { path, .. }
            | ManifestError::Field { path, .. }
            | ManifestError::Duplicate { path, .. } => path,
        }
    }
}

/// Defines a validated name type: letters, digits, `-` and `_`, at most 64
/// characters. Names end up in log fields, metrics labels and (for queue
/// groups) on the wire, so they are kept boring.
macro_rules! name_type {
    ($(#[$doc:meta])* $ty:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $ty(String);

        impl $ty {
            /// The name as a string.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $ty {
            type Err = String;

            fn from_str(s: &str) -> Result<Self, String> {
                if s.is_empty() {
                    return Err("must not be empty".into());
                }
                if s.len() > 64 {
                    return Err(format!("`{s}` is longer than 64 characters"));
                }
                if let Some(c) = s.chars().find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_')) {
                    return Err(format!("`{s}` contains `{c}`; use letters, digits, `-` and `_`"));
                }
                Ok($ty(s.to_owned()))
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

name_type!(
    /// A handler's name, unique within its tenant.
    HandlerName
);
name_type!(
    /// The tenant a handler belongs to.
    TenantId
);
name_type!(
    /// A NATS queue group: members share the messages of a subscription.
    QueueGroup
);
name_type!(
    /// A JetStream stream name.
    StreamName
);
name_type!(
    /// A durable JetStream consumer name.
    ConsumerName
);
name_type!(
    /// A KV or object-store bucket name.
    BucketName
);

impl Default for TenantId {
    fn default() -> Self {
        TenantId("default".to_owned())
    }
}

/// One way messages reach a handler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trigger {
    /// A core NATS subscription, optionally in a queue group.
    Subject {
        /// The subscribed subject, wildcards allowed.
        subject: SubjectPattern,
        /// Queue group, to spread messages over several subscribers.
        queue: Option<QueueGroup>,
    },
    /// A durable JetStream pull consumer.
    JetStream(JetStreamTrigger),
}

impl fmt::Display for Trigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Trigger::Subject { subject, queue: None } => write!(f, "subject {subject}"),
            Trigger::Subject { subject, queue: Some(q) } => write!(f, "subject {subject} (queue {q})"),
            Trigger::JetStream(js) => match &js.kv {
                Some(w) => write!(f, "kv-watch {} {} (durable {})", w.bucket, w.keys, js.durable),
                None => write!(f, "jetstream {}/{}", js.stream, js.durable),
            },
        }
    }
}

/// Where a new durable consumer starts in its stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliverFrom {
    /// The first message in the stream.
    All,
    /// Only messages stored after the consumer is created.
    New,
    /// The message with this stream sequence.
    Sequence(u64),
    /// The first message stored at or after this time (RFC 3339).
    Time(String),
    /// The latest message of each subject (for a KV bucket: each key's
    /// current value), then everything new.
    LastPerSubject,
}

/// What a KV-watch trigger watches; the JetStream consumer underneath reads
/// the bucket's stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvWatch {
    /// The bucket.
    pub bucket: BucketName,
    /// Keys, as a subject-style pattern (`>` for all).
    pub keys: SubjectPattern,
}

/// What the host does with a message whose handler failed (`fail`, trap,
/// timeout, memory limit), before `max_deliver` is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    /// Give up on it at once: dead-letter, then term.
    Term,
    /// Let it be delivered again (dead-lettered at `max_deliver`).
    Nak,
}

/// A `[[trigger]] jetstream = {...}` binding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JetStreamTrigger {
    /// The stream to consume.
    pub stream: StreamName,
    /// The durable consumer, created or updated to match this trigger.
    pub durable: ConsumerName,
    /// Subjects within the stream; empty means all of it.
    pub filters: Vec<SubjectPattern>,
    /// Where a new consumer starts.
    pub deliver: DeliverFrom,
    /// How long the server waits for an ack before redelivering.
    pub ack_wait: Duration,
    /// Deliveries before the host gives up on a message.
    pub max_deliver: u32,
    /// Redelivery delays after ack-wait timeouts, one per attempt.
    pub backoff: Vec<Duration>,
    /// Most messages this trigger's open pulls ask for at once (never more
    /// than free slots, nor the trigger's share of `max_concurrency`).
    pub batch: u32,
    /// Most unacknowledged messages the server hands this consumer.
    pub max_ack_pending: u32,
    /// Where given-up messages are published, with headers saying why.
    pub dead_letter: Option<Subject>,
    /// What a failed handler means for the message.
    pub on_error: OnError,
    /// Set when this consumer watches a KV bucket: deliveries carry
    /// `kv-meta`, and the host never creates the bucket's stream.
    pub kv: Option<KvWatch>,
}

/// Defaults of a JetStream trigger, documented in the README.
pub mod jetstream_defaults {
    use std::time::Duration;

    /// Server-side wait for an ack before redelivery.
    pub const ACK_WAIT: Duration = Duration::from_secs(30);
    /// Deliveries before a message is dead-lettered.
    pub const MAX_DELIVER: u32 = 5;
    /// Unacknowledged messages the server allows the consumer.
    pub const MAX_ACK_PENDING: u32 = 1000;
}

/// A validated handler manifest.
#[derive(Debug, Clone)]
pub struct Manifest {
    /// Where the manifest came from: a file path, or a label for manifests
    /// given as bytes.
    pub origin: PathBuf,
    /// The handler's name.
    pub name: HandlerName,
    /// The tenant that owns the handler.
    pub tenant: TenantId,
    /// The component file, resolved against the manifest's folder. `None`
    /// only for manifests given as bytes together with their component.
    pub component: Option<PathBuf>,
    /// What delivers messages to the handler.
    pub triggers: Vec<Trigger>,
    /// Memory, time and concurrency limits.
    pub limits: Limits,
    /// Whether each message gets a fresh instance (the default) or an
    /// instance may be reused (`instance = "reuse"`).
    pub instance: InstanceMode,
    /// What the handler may publish and request.
    pub permissions: Permissions,
    /// The `[config]` table, every value as a string.
    pub config: BTreeMap<String, String>,
}

/// How instances are used across messages: the manifest's top-level
/// `instance` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InstanceMode {
    /// `"fresh"`, the default: every message runs on a new instance, so
    /// nothing a guest does survives into the next message.
    #[default]
    Fresh,
    /// `"reuse"`: an opt-in for handlers that declare themselves stateless.
    /// An instance that finished cleanly (returned `Ok` or a handler error)
    /// handles later messages, with its globals and heap as the last
    /// message left them; one that trapped, timed out, hit its memory limit
    /// or was abandoned is thrown away. Limits still apply per message.
    Reuse,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    name: String,
    component: Option<String>,
    tenant: Option<String>,
    instance: Option<String>,
    #[serde(default, rename = "trigger")]
    triggers: Vec<RawTrigger>,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    permissions: RawPermissions,
    #[serde(default)]
    config: BTreeMap<String, toml::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTrigger {
    subject: Option<String>,
    queue: Option<String>,
    jetstream: Option<RawJetStream>,
    kv_watch: Option<RawKvWatch>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKvWatch {
    bucket: String,
    keys: Option<String>,
    #[serde(default)]
    include_history: bool,
    deliver: Option<String>,
    durable: Option<String>,
    max_deliver: Option<u32>,
    dead_letter: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJetStream {
    stream: String,
    durable: String,
    #[serde(default)]
    filter: OneOrMany,
    deliver: Option<String>,
    start_sequence: Option<u64>,
    start_time: Option<String>,
    ack_wait_ms: Option<u64>,
    max_deliver: Option<u32>,
    #[serde(default)]
    backoff_ms: Vec<u64>,
    batch: Option<u32>,
    max_ack_pending: Option<u32>,
    dead_letter: Option<String>,
    on_error: Option<String>,
}

/// A field that takes one string or a list of them.
#[derive(Deserialize, Default)]
#[serde(untagged)]
enum OneOrMany {
    #[default]
    None,
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::None => Vec::new(),
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    memory_mb: Option<u32>,
    timeout_ms: Option<u64>,
    max_concurrency: Option<u32>,
    fuel: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPermissions {
    #[serde(default)]
    publish: Vec<String>,
    #[serde(default)]
    request: Vec<String>,
    #[serde(default)]
    kv: BTreeMap<String, String>,
    #[serde(default)]
    object: BTreeMap<String, String>,
}

impl Manifest {
    /// Reads and validates the manifest file at `path`.
    pub fn from_file(path: &Path) -> Result<Manifest, ManifestError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ManifestError::Read { path: path.to_owned(), source })?;
        let manifest = Manifest::from_toml(&text, path)?;
        let problem = match &manifest.component {
            Some(component) if component.is_file() => return Ok(manifest),
            Some(component) => format!("{} does not exist or is not a file", component.display()),
            // Without this check the manifest itself would be read as the
            // component, and fail as "not a valid WebAssembly component".
            None => "missing: a manifest in a handlers directory names its component file \
                     (e.g. `component = \"handler.wasm\"`, relative to the manifest)"
                .into(),
        };
        Err(ManifestError::Field { path: path.to_owned(), field: "component".into(), problem })
    }

    /// Parses and validates manifest text. `origin` names it in errors and
    /// anchors a relative `component` path; the component file itself is not
    /// checked here, so this also serves manifests whose wasm comes as bytes.
    pub fn from_toml(text: &str, origin: &Path) -> Result<Manifest, ManifestError> {
        let raw: RawManifest = toml::from_str(text).map_err(|e| ManifestError::Syntax {
            path: origin.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        Manifest::from_raw(raw, origin)
    }

    fn from_raw(raw: RawManifest, origin: &Path) -> Result<Manifest, ManifestError> {
        let field_err = |field: &str, problem: String| ManifestError::Field {
            path: origin.to_owned(),
            field: field.to_owned(),
            problem,
        };

        let name = raw.name.parse().map_err(|p| field_err("name", p))?;
        let tenant = match raw.tenant {
            Some(t) => t.parse().map_err(|p| field_err("tenant", p))?,
            None => TenantId::default(),
        };
        let component = match raw.component {
            Some(c) if c.is_empty() => return Err(field_err("component", "must not be empty".into())),
            Some(c) => Some(origin.parent().unwrap_or(Path::new(".")).join(c)),
            None => None,
        };

        if raw.triggers.is_empty() {
            return Err(field_err("trigger", "no [[trigger]] table: a handler needs at least one".into()));
        }
        let limits = resolve_limits(&raw.limits).map_err(|(field, p)| field_err(field, p))?;
        let instance = match raw.instance.as_deref() {
            None | Some("fresh") => InstanceMode::Fresh,
            Some("reuse") => InstanceMode::Reuse,
            Some(other) => return Err(field_err("instance", format!("`{other}` is neither \"fresh\" nor \"reuse\""))),
        };

        let mut triggers = Vec::with_capacity(raw.triggers.len());
        for (i, t) in raw.triggers.into_iter().enumerate() {
            let at = |field: &str| format!("trigger[{i}]{field}");
            let trigger = match (t.subject, t.jetstream, t.kv_watch) {
                (Some(subject), None, None) => {
                    let subject = subject.parse().map_err(|e| field_err(&at(".subject"), format!("{e}")))?;
                    let queue = t.queue.map(|q| q.parse()).transpose().map_err(|p| field_err(&at(".queue"), p))?;
                    Trigger::Subject { subject, queue }
                }
                (None, js, watch) if t.queue.is_some() && (js.is_some() || watch.is_some()) => {
                    return Err(field_err(
                        &at(".queue"),
                        "applies to subject triggers; JetStream consumers share work through `durable`".into(),
                    ));
                }
                (None, Some(js), None) => {
                    let js = resolve_jetstream(js, &limits)
                        .map_err(|(field, p)| field_err(&at(&format!(".jetstream.{field}")), p))?;
                    Trigger::JetStream(js)
                }
                (None, None, Some(w)) => {
                    let js = resolve_kv_watch(w, &name, &limits)
                        .map_err(|(field, p)| field_err(&at(&format!(".kv_watch.{field}")), p))?;
                    Trigger::JetStream(js)
                }
                (None, None, None) => {
                    return Err(field_err(&at(""), "needs one of `subject`, `jetstream`, `kv_watch`".into()))
                }
                _ => {
                    return Err(field_err(
                        &at(""),
                        "has more than one of `subject`, `jetstream`, `kv_watch`; use one per [[trigger]]".into(),
                    ))
                }
            };
            triggers.push(trigger);
        }

        let patterns = |list: Vec<String>, field: &str| -> Result<Vec<SubjectPattern>, ManifestError> {
            list.iter()
                .enumerate()
                .map(|(i, s)| s.parse().map_err(|e| field_err(&format!("{field}[{i}]"), format!("{e}"))))
                .collect()
        };
        let buckets =
            |map: BTreeMap<String, String>, field: &str| -> Result<BTreeMap<BucketName, Access>, ManifestError> {
                map.into_iter()
                    .map(|(bucket, access)| {
                        let name = bucket.parse().map_err(|p| field_err(&format!("{field}.{bucket}"), p))?;
                        let access = match access.as_str() {
                            "read" => Access::Read,
                            "write" => Access::Write,
                            other => {
                                return Err(field_err(
                                    &format!("{field}.{bucket}"),
                                    format!("`{other}` is not one of read, write"),
                                ))
                            }
                        };
                        Ok((name, access))
                    })
                    .collect()
            };
        let permissions = Permissions {
            publish: patterns(raw.permissions.publish, "permissions.publish")?,
            request: patterns(raw.permissions.request, "permissions.request")?,
            kv: buckets(raw.permissions.kv, "permissions.kv")?,
            object: buckets(raw.permissions.object, "permissions.object")?,
        };

        let mut config = BTreeMap::new();
        for (key, value) in raw.config {
            let text = match value {
                toml::Value::String(s) => s,
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                other => {
                    return Err(field_err(
                        &format!("config.{key}"),
                        format!("must be a string, number or boolean, not {}", other.type_str()),
                    ))
                }
            };
            config.insert(key, text);
        }

        Ok(Manifest {
            origin: origin.to_owned(),
            name,
            tenant,
            component,
            triggers,
            limits,
            instance,
            permissions,
            config,
        })
    }
}

/// Applies defaults and ceilings to `[limits]`; an error names the field.
fn resolve_limits(raw: &RawLimits) -> Result<Limits, (&'static str, String)> {
    let mut limits = Limits::default();
    if let Some(mb) = raw.memory_mb {
        if mb == 0 || mb > limits::MAX_MEMORY_MB {
            return Err(("limits.memory_mb", format!("{mb} is outside 1..={}", limits::MAX_MEMORY_MB)));
        }
        limits.memory_bytes = mb as usize * 1024 * 1024;
    }
    if let Some(ms) = raw.timeout_ms {
        if ms == 0 {
            return Err(("limits.timeout_ms", "must be at least 1".into()));
        }
        limits.timeout = Duration::from_millis(ms);
    }
    if let Some(n) = raw.max_concurrency {
        if n == 0 {
            return Err(("limits.max_concurrency", "must be at least 1".into()));
        }
        limits.max_concurrency = n;
    }
    if let Some(fuel) = raw.fuel {
        if fuel == 0 {
            return Err(("limits.fuel", "must be at least 1".into()));
        }
        limits.fuel = Some(fuel);
    }
    Ok(limits)
}

/// Checks a `jetstream = {...}` table; an error names the field within it.
fn resolve_jetstream(raw: RawJetStream, limits: &Limits) -> Result<JetStreamTrigger, (String, String)> {
    use jetstream_defaults as d;
    let stream = raw.stream.parse().map_err(|p| ("stream".to_owned(), p))?;
    let durable = raw.durable.parse().map_err(|p| ("durable".to_owned(), p))?;
    let filters = raw
        .filter
        .into_vec()
        .iter()
        .enumerate()
        .map(|(i, s)| s.parse().map_err(|e| (format!("filter[{i}]"), format!("{e}"))))
        .collect::<Result<Vec<SubjectPattern>, _>>()?;
    let deliver = match (raw.deliver.as_deref().unwrap_or("all"), raw.start_sequence, raw.start_time) {
        ("all", None, None) => DeliverFrom::All,
        ("new", None, None) => DeliverFrom::New,
        ("by-start-sequence", Some(seq), None) => DeliverFrom::Sequence(seq),
        ("by-start-time", None, Some(time)) => {
            async_nats::datetime::parse_rfc3339(&time)
                .map_err(|e| ("start_time".to_owned(), format!("`{time}` is not an RFC 3339 time: {e}")))?;
            DeliverFrom::Time(time)
        }
        ("by-start-sequence", None, _) => {
            return Err(("start_sequence".into(), "is required with deliver = \"by-start-sequence\"".into()))
        }
        ("by-start-time", _, None) => {
            return Err(("start_time".into(), "is required with deliver = \"by-start-time\"".into()))
        }
        ("all" | "new" | "by-start-sequence" | "by-start-time", _, _) => {
            return Err((
                "deliver".into(),
                "start_sequence goes with \"by-start-sequence\" and start_time with \"by-start-time\" only".into(),
            ))
        }
        (other, _, _) => {
            return Err((
                "deliver".into(),
                format!("`{other}` is not one of all, new, by-start-sequence, by-start-time"),
            ))
        }
    };
    let positive = |v: Option<u32>, field: &str, default: u32| match v {
        Some(0) => Err((field.to_owned(), "must be at least 1".to_owned())),
        Some(n) => Ok(n),
        None => Ok(default),
    };
    // The server replaces ack_wait with the first backoff step; accepting
    // both would silently ignore one of them.
    let ack_wait = match (raw.ack_wait_ms, raw.backoff_ms.first()) {
        (Some(_), Some(_)) => {
            return Err((
                "ack_wait_ms".into(),
                "is ignored by the server when backoff_ms is set (the first backoff step is the ack wait); set one"
                    .into(),
            ))
        }
        (Some(0), None) => return Err(("ack_wait_ms".into(), "must be at least 1".into())),
        (Some(ms), None) => Duration::from_millis(ms),
        (None, Some(&first)) => Duration::from_millis(first),
        (None, None) => d::ACK_WAIT,
    };
    let dead_letter =
        raw.dead_letter.map(|s| s.parse()).transpose().map_err(|e| ("dead_letter".to_owned(), format!("{e}")))?;
    let on_error = match raw.on_error.as_deref() {
        None | Some("term") => OnError::Term,
        Some("nak") => OnError::Nak,
        Some(other) => return Err(("on_error".into(), format!("`{other}` is not one of term, nak"))),
    };
    Ok(JetStreamTrigger {
        stream,
        durable,
        filters,
        deliver,
        ack_wait,
        max_deliver: positive(raw.max_deliver, "max_deliver", d::MAX_DELIVER)?,
        backoff: raw.backoff_ms.into_iter().map(Duration::from_millis).collect(),
        batch: positive(raw.batch, "batch", limits.max_concurrency)?,
        max_ack_pending: positive(raw.max_ack_pending, "max_ack_pending", d::MAX_ACK_PENDING)?,
        dead_letter,
        on_error,
        kv: None,
    })
}

/// Checks a `kv_watch = {...}` table and turns it into the durable consumer
/// on the bucket's stream that implements it.
fn resolve_kv_watch(
    raw: RawKvWatch,
    handler: &HandlerName,
    limits: &Limits,
) -> Result<JetStreamTrigger, (String, String)> {
    use jetstream_defaults as d;
    let bucket: BucketName = raw.bucket.parse().map_err(|p| ("bucket".to_owned(), p))?;
    let keys: SubjectPattern =
        raw.keys.as_deref().unwrap_or(">").parse().map_err(|e| ("keys".to_owned(), format!("{e}")))?;
    let deliver = match (raw.deliver.as_deref(), raw.include_history) {
        (None | Some("last"), false) => DeliverFrom::LastPerSubject,
        (None | Some("all"), true) | (Some("all"), false) => DeliverFrom::All,
        (Some("new"), false) => DeliverFrom::New,
        (Some(other @ ("last" | "new")), true) => {
            return Err(("deliver".into(), format!("`{other}` contradicts include_history = true")))
        }
        (Some(other), _) => return Err(("deliver".into(), format!("`{other}` is not one of last, all, new"))),
    };
    let durable =
        raw.durable.unwrap_or_else(|| format!("kvw-{handler}")).parse().map_err(|p| ("durable".to_owned(), p))?;
    // The bucket's stream stores key `k` under `$KV.<bucket>.k`.
    let filter = format!("$KV.{bucket}.{keys}").parse().map_err(|e| ("keys".to_owned(), format!("{e}")))?;
    let stream = format!("KV_{bucket}").parse().map_err(|p| ("bucket".to_owned(), p))?;
    let max_deliver = match raw.max_deliver {
        Some(0) => return Err(("max_deliver".into(), "must be at least 1".into())),
        Some(n) => n,
        None => d::MAX_DELIVER,
    };
    let dead_letter =
        raw.dead_letter.map(|s| s.parse()).transpose().map_err(|e| ("dead_letter".to_owned(), format!("{e}")))?;
    Ok(JetStreamTrigger {
        stream,
        durable,
        filters: vec![filter],
        deliver,
        ack_wait: d::ACK_WAIT,
        max_deliver,
        backoff: Vec::new(),
        batch: limits.max_concurrency,
        max_ack_pending: d::MAX_ACK_PENDING,
        dead_letter,
        on_error: OnError::Term,
        kv: Some(KvWatch { bucket, keys }),
    })
}

/// Finds and loads every manifest in a handlers directory: `*.toml` files at
/// its top level, and `natsfn.toml` in its immediate subfolders. Results come
/// in path order so that which of two duplicates wins does not depend on the
/// file system; a duplicate is reported as an error against the later file.
pub fn discover(dir: &Path) -> Result<Vec<Result<Manifest, ManifestError>>, std::io::Error> {
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            let inner = path.join("natsfn.toml");
            if inner.is_file() {
                paths.push(inner);
            }
        } else if path.extension().is_some_and(|e| e == "toml") {
            paths.push(path);
        }
    }
    paths.sort();

    let mut seen: HashMap<(TenantId, HandlerName), PathBuf> = HashMap::new();
    Ok(paths
        .into_iter()
        .map(|path| {
            let manifest = Manifest::from_file(&path)?;
            let key = (manifest.tenant.clone(), manifest.name.clone());
            if let Some(first) = seen.get(&key) {
                return Err(ManifestError::Duplicate { path, name: key.1, tenant: key.0, first: first.clone() });
            }
            seen.insert(key, path);
            Ok(manifest)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Manifest, ManifestError> {
        Manifest::from_toml(text, Path::new("/h/orders.toml"))
    }

    fn err(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    const MINIMAL: &str = "name = \"a\"\n[[trigger]]\nsubject = \"x.y\"\n";

    #[test]
    fn full_manifest_parses() {
        let m = parse(
            r#"
            name = "orders-enricher"
            component = "orders.wasm"
            tenant = "acme"
            [[trigger]]
            subject = "orders.*.created"
            queue = "enrichers"
            [[trigger]]
            subject = "orders.>"
            [limits]
            memory_mb = 16
            timeout_ms = 250
            max_concurrency = 4
            [permissions]
            publish = ["orders.enriched", "audit.>"]
            request = ["pricing.quote"]
            [config]
            greeting = "hello"
            retries = 3
            "#,
        )
        .unwrap();
        assert_eq!(m.name.as_str(), "orders-enricher");
        assert_eq!(m.tenant.as_str(), "acme");
        assert_eq!(m.component.as_deref(), Some(Path::new("/h/orders.wasm")));
        assert_eq!(m.triggers.len(), 2);
        assert_eq!(m.limits.memory_bytes, 16 << 20);
        assert_eq!(m.limits.timeout, Duration::from_millis(250));
        assert_eq!(m.limits.max_concurrency, 4);
        assert_eq!(m.permissions.publish.len(), 2);
        assert_eq!(m.config["retries"], "3");
    }

    #[test]
    fn defaults_apply() {
        let m = parse(MINIMAL).unwrap();
        assert_eq!(m.tenant.as_str(), "default");
        assert_eq!(m.limits, Limits::default());
        assert!(m.permissions.publish.is_empty());
        assert!(m.component.is_none());
        assert_eq!(m.instance, InstanceMode::Fresh);
    }

    #[test]
    fn instance_mode_is_fresh_or_reuse() {
        assert_eq!(parse(&format!("instance = \"reuse\"\n{MINIMAL}")).unwrap().instance, InstanceMode::Reuse);
        assert_eq!(parse(&format!("instance = \"fresh\"\n{MINIMAL}")).unwrap().instance, InstanceMode::Fresh);
        let e = err(&format!("instance = \"pooled\"\n{MINIMAL}"));
        assert!(e.contains(": instance: `pooled`"), "{e}");
    }

    #[test]
    fn unknown_fields_are_named() {
        let e = err(&format!("{MINIMAL}colour = \"red\"\n"));
        assert!(e.starts_with("/h/orders.toml: "), "{e}");
        assert!(e.contains("unknown field `colour`"), "{e}");
        let e = err(&format!("{MINIMAL}[limits]\nmemory = 3\n"));
        assert!(e.contains("unknown field `memory`"), "{e}");
    }

    #[test]
    fn bad_subjects_name_the_field() {
        for (subject, why) in
            [("a..b", "empty token"), ("a.>.b", "may only be the last token"), ("a b", "whitespace"), ("", "empty")]
        {
            let e =
                err(&format!("name = \"a\"\n[[trigger]]\nsubject = \"ok\"\n[[trigger]]\nsubject = \"{subject}\"\n"));
            assert!(e.starts_with("/h/orders.toml: trigger[1].subject: "), "{e}");
            assert!(e.contains(why), "{e}");
        }
        let e = err(&format!("{MINIMAL}[permissions]\npublish = [\"ok\", \"bad..\"]\n"));
        assert!(e.starts_with("/h/orders.toml: permissions.publish[1]: "), "{e}");
    }

    #[test]
    fn bad_values_name_the_field() {
        assert!(err("name = \"a b\"\n[[trigger]]\nsubject = \"x\"\n").contains(": name: "));
        assert!(err("name = \"a\"\n").contains(": trigger: no [[trigger]]"));
        assert!(err(&format!("{MINIMAL}[limits]\nmemory_mb = 0\n")).contains(": limits.memory_mb: "));
        assert!(err(&format!("{MINIMAL}[limits]\ntimeout_ms = 0\n")).contains(": limits.timeout_ms: "));
        assert!(err(&format!("{MINIMAL}[config]\nx = [1]\n")).contains(": config.x: "));
        assert!(err("name = \"a\"\n[[trigger]]\nsubject = \"x\"\nqueue = \"q q\"\n").contains(": trigger[0].queue: "));
        assert!(err("name = 3\n").contains("invalid type"));
    }

    #[test]
    fn jetstream_trigger_parses_with_defaults_and_names_bad_fields() {
        let m = parse(
            "name = \"w\"\n[limits]\nmax_concurrency = 7\n[[trigger]]\njetstream = { stream = \"ORDERS\", durable = \"w\", filter = [\"orders.>\", \"refunds.*\"], max_deliver = 3, backoff_ms = [500, 20], dead_letter = \"orders.dlq\", on_error = \"nak\" }\n",
        )
        .unwrap();
        let Trigger::JetStream(js) = &m.triggers[0] else { panic!("not jetstream") };
        assert_eq!(js.stream.as_str(), "ORDERS");
        assert_eq!(js.filters.len(), 2);
        assert_eq!(js.ack_wait, Duration::from_millis(500));
        assert_eq!((js.max_deliver, js.batch, js.max_ack_pending), (3, 7, 1000));
        assert_eq!(js.backoff, vec![Duration::from_millis(500), Duration::from_millis(20)]);
        assert_eq!(js.dead_letter.as_ref().unwrap().as_str(), "orders.dlq");
        assert_eq!((js.on_error, &js.deliver), (OnError::Nak, &DeliverFrom::All));

        let js = |table: &str| err(&format!("name = \"w\"\n[[trigger]]\njetstream = {{ {table} }}\n"));
        assert!(js("stream = \"A B\", durable = \"d\"").contains("trigger[0].jetstream.stream: "));
        assert!(js("stream = \"S\", durable = \"d\", filter = \"a..b\"").contains("trigger[0].jetstream.filter[0]: "));
        assert!(
            js("stream = \"S\", durable = \"d\", deliver = \"sometime\"").contains("trigger[0].jetstream.deliver: ")
        );
        assert!(js("stream = \"S\", durable = \"d\", deliver = \"by-start-sequence\"")
            .contains("jetstream.start_sequence: is required"));
        assert!(js("stream = \"S\", durable = \"d\", deliver = \"by-start-time\", start_time = \"yesterday\"")
            .contains("jetstream.start_time: "));
        assert!(js("stream = \"S\", durable = \"d\", ack_wait_ms = 5, backoff_ms = [1]")
            .contains("jetstream.ack_wait_ms: is ignored by the server when backoff_ms is set"));
        assert!(js("stream = \"S\", durable = \"d\", max_deliver = 0")
            .contains("jetstream.max_deliver: must be at least 1"));
        assert!(js("stream = \"S\", durable = \"d\", dead_letter = \"dlq.*\"").contains("jetstream.dead_letter: "));
        assert!(js("stream = \"S\", durable = \"d\", on_error = \"panic\"").contains("jetstream.on_error: "));
        assert!(js("stream = \"S\"").contains("missing field `durable`"));
        assert!(err("name = \"w\"\n[[trigger]]\nsubject = \"x\"\njetstream = { stream = \"S\", durable = \"d\" }\n")
            .contains("trigger[0]: has more than one of"));
        assert!(err("name = \"w\"\n[[trigger]]\nqueue = \"q\"\n")
            .contains("trigger[0]: needs one of `subject`, `jetstream`, `kv_watch`"));
    }

    #[test]
    fn kv_watch_and_bucket_permissions_parse() {
        let m = parse(
            "name = \"mirror\"\n[[trigger]]\nkv_watch = { bucket = \"src\", keys = \"app.>\" }\n[permissions]\nkv = { src = \"read\", dst = \"write\" }\nobject = { images = \"read\" }\n",
        )
        .unwrap();
        let Trigger::JetStream(js) = &m.triggers[0] else { panic!("not a consumer") };
        assert_eq!(js.stream.as_str(), "KV_src");
        assert_eq!(js.durable.as_str(), "kvw-mirror");
        assert_eq!(js.filters[0].as_str(), "$KV.src.app.>");
        assert_eq!(js.deliver, DeliverFrom::LastPerSubject);
        assert_eq!(js.kv.as_ref().unwrap().bucket.as_str(), "src");
        assert_eq!(m.permissions.kv.len(), 2);
        assert_eq!(m.permissions.object[&"images".parse().unwrap()], Access::Read);

        let e = err("name = \"m\"\n[[trigger]]\nsubject = \"x\"\n[permissions]\nkv = { src = \"admin\" }\n");
        assert!(e.contains("permissions.kv.src: `admin` is not one of read, write"), "{e}");
        let e = err("name = \"m\"\n[[trigger]]\nkv_watch = { bucket = \"a.b\" }\n");
        assert!(e.contains("trigger[0].kv_watch.bucket: "), "{e}");
        let e = err("name = \"m\"\n[[trigger]]\nkv_watch = { bucket = \"b\", keys = \"a..b\" }\n");
        assert!(e.contains("trigger[0].kv_watch.keys: "), "{e}");
    }

    #[test]
    fn missing_component_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.toml");
        std::fs::write(&path, format!("component = \"nope.wasm\"\n{MINIMAL}")).unwrap();
        let e = Manifest::from_file(&path).unwrap_err().to_string();
        assert!(e.contains("a.toml: component: ") && e.contains("nope.wasm does not exist"), "{e}");
    }

    #[test]
    fn a_manifest_file_without_component_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.toml");
        std::fs::write(&path, MINIMAL).unwrap();
        let e = Manifest::from_file(&path).unwrap_err().to_string();
        assert!(e.contains("a.toml: component: missing"), "{e}");
    }

    #[test]
    fn discover_finds_both_layouts_and_reports_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let write = |rel: &str, name: &str| {
            let path = dir.path().join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            let component = path.with_extension("wasm");
            std::fs::write(&component, "").unwrap();
            let file = component.file_name().unwrap().to_str().unwrap();
            let text = format!("name = \"{name}\"\ncomponent = \"{file}\"\n[[trigger]]\nsubject = \"x\"\n");
            std::fs::write(&path, text).unwrap();
        };
        write("a.toml", "one");
        write("b.toml", "one");
        write("folder/natsfn.toml", "two");
        write("folder-without-manifest/other.toml", "ignored");
        std::fs::write(dir.path().join("notes.txt"), "not a manifest").unwrap();

        let found = discover(dir.path()).unwrap();
        assert_eq!(found.len(), 3);
        assert_eq!(found[0].as_ref().unwrap().name.as_str(), "one");
        let dup = found[1].as_ref().unwrap_err().to_string();
        assert!(dup.contains("b.toml: name: handler `one` of tenant `default` is already defined by"), "{dup}");
        assert!(dup.contains("a.toml"), "{dup}");
        assert_eq!(found[2].as_ref().unwrap().name.as_str(), "two");
    }
}
