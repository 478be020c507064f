//! The `natsfn` command line: argument parsing and the glue from flags to
//! the library. Everything it does is available to embedders through
//! [`crate::Host`]; the binary only adds signals, a local server and exit codes.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::buckets::{BucketKind, BucketSpec};
use crate::local_server::NatsServer;
use crate::telemetry::{Otlp, OtlpPipeline, Protocol, Sampler, TelemetryError, Tracer};
use crate::{Host, HostConfig};

/// Run sandboxed WebAssembly handlers on NATS subjects.
#[derive(Debug, Parser)]
#[command(name = "natsfn", version, about)]
pub struct Cli {
    /// Worker threads of the host's runtime, which runs the triggers, the
    /// host calls and the guests of tenants without threads of their own
    /// (default: one per core). On a small, lightly loaded machine one
    /// thread can answer requests sooner, since nothing crosses threads
    /// (BENCHMARKS.md, "Standby instances"); more threads give throughput.
    #[arg(long, global = true, value_name = "N", env = "NATSFN_THREADS", value_parser = clap::value_parser!(u16).range(1..))]
    threads: Option<u16>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Load handlers and serve them until SIGINT or SIGTERM.
    Run(RunArgs),
    /// `run --watch` for development: reloads handlers as you rebuild them
    /// and prints what changed; starts a local nats-server unless --nats.
    Dev(RunArgs),
    /// Check manifests and components without connecting to NATS.
    Validate(ValidateArgs),
    /// Send one request and print the reply: a small NATS client for trying
    /// handlers out without installing another tool.
    Request(SendArgs),
    /// Publish one message.
    Publish(SendArgs),
    /// Measure your handlers against a native async-nats handler, back to
    /// back on the same server: msgs/s, request latency percentiles, CPU
    /// time per message, peak RSS, and the ratio natsfn/native. The native
    /// side does no work of its own: it echoes the payload to the reply
    /// subject (and to --output), or acks JetStream messages. Starts a local
    /// nats-server unless --nats.
    Bench(BenchArgs),
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum BenchMode {
    /// Core publish, fire-and-forget; completion is the handler finishing.
    Publish,
    /// Core request/reply; every round trip is timed.
    Request,
    /// Messages stored in --stream first, then consumed and acked; the
    /// handlers' manifest needs a jetstream trigger on that stream.
    Jetstream,
}

#[derive(Debug, clap::Args)]
struct BenchArgs {
    #[command(flatten)]
    handlers: HandlerDirs,

    /// Subject the messages are sent to (for jetstream: stored under).
    #[arg(long, value_name = "SUBJECT")]
    subject: String,

    /// How messages reach the handler.
    #[arg(long, value_enum, default_value_t = BenchMode::Request)]
    mode: BenchMode,

    /// The stream for --mode jetstream: created if missing (file storage)
    /// and purged before each side runs.
    #[arg(long, value_name = "NAME", default_value = "NATSFN_BENCH")]
    stream: String,

    /// Payload bytes per message.
    #[arg(long, value_name = "BYTES", default_value_t = 128)]
    payload_size: usize,

    /// Messages per side.
    #[arg(long, value_name = "N", default_value_t = 100_000)]
    messages: u64,

    /// Concurrent requesters (request mode).
    #[arg(long, value_name = "N", default_value_t = 1)]
    concurrency: usize,

    /// For a handler that publishes one message per input: the subject it
    /// publishes to; completion is counted there on both sides.
    #[arg(long, value_name = "SUBJECT")]
    output: Option<String>,

    /// The scenario's name in the table and the JSON.
    #[arg(long, default_value = "bench")]
    name: String,

    /// Rounds of both sides, alternating which goes first. Each side's
    /// figures are then medians, and the ratio is the median of the rounds'
    /// ratios: on a machine whose speed drifts (a VM), use 5 or more.
    #[arg(long, value_name = "N", default_value_t = 1)]
    rounds: u32,

    /// Also write the results as JSON here.
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,

    /// NATS server URL. Without it, a local nats-server is started.
    #[arg(long, value_name = "URL", env = "NATSFN_NATS")]
    nats: Option<String>,

    /// Instances alive at once across all handlers (the instance pool size).
    #[arg(long, value_name = "N", default_value_t = crate::limits::DEFAULT_MAX_INSTANCES)]
    max_instances: u32,

    /// After the scenario, time this many fresh and as many reused
    /// instances of each handler in the directories, alone (instantiate,
    /// call, drop; no NATS in the loop). 0 skips it.
    #[arg(long, value_name = "N", default_value_t = 2000)]
    instance_iterations: u32,
}

#[derive(Debug, clap::Args)]
struct SendArgs {
    /// NATS server URL.
    #[arg(long, value_name = "URL", env = "NATSFN_NATS", default_value = "nats://127.0.0.1:4222")]
    nats: String,

    /// Subject to send to.
    subject: String,

    /// Payload, as text.
    #[arg(default_value = "")]
    payload: String,

    /// Seconds to wait for a reply (request only).
    #[arg(long, value_name = "SECS", default_value_t = 5)]
    timeout: u64,
}

#[derive(Debug, Clone, clap::Args)]
struct ValidateArgs {
    #[command(flatten)]
    handlers: HandlerDirs,

    /// A host config file to check too (its `handlers` are validated).
    #[arg(long, value_name = "FILE", env = "NATSFN_CONFIG")]
    config: Option<PathBuf>,
}

#[derive(Debug, Clone, clap::Args)]
struct HandlerDirs {
    /// A directory of handlers: `<name>.toml` manifests beside their `.wasm`,
    /// or folders holding a `natsfn.toml`. Repeat for several directories.
    #[arg(long = "handlers", value_name = "DIR", env = "NATSFN_HANDLERS", value_delimiter = ',')]
    dirs: Vec<PathBuf>,
}

#[derive(Debug, Clone, clap::Args)]
struct RunArgs {
    #[command(flatten)]
    handlers: HandlerDirs,

    /// Host config file (TOML): tenants with their NATS credentials, TLS and
    /// limits, handler directories, pool size. See the README.
    #[arg(long, value_name = "FILE", env = "NATSFN_CONFIG")]
    config: Option<PathBuf>,

    /// NATS server URL. Without it (here or in the host config), natsfn
    /// starts a local nats-server (with JetStream, on a free loopback port)
    /// and stops it on exit.
    #[arg(long, value_name = "URL", env = "NATSFN_NATS")]
    nats: Option<String>,

    /// Reload handlers when their manifests or components change.
    #[arg(long, env = "NATSFN_WATCH")]
    watch: bool,

    /// Seconds to wait for in-flight invocations on shutdown.
    #[arg(long, value_name = "SECS", default_value_t = 10, env = "NATSFN_SHUTDOWN_TIMEOUT")]
    shutdown_timeout: u64,

    /// Where compiled machine code is cached between runs (default: the
    /// user's cache folder, `$XDG_CACHE_HOME/natsfn` or `~/.cache/natsfn`).
    #[arg(long, value_name = "DIR", env = "NATSFN_CACHE_DIR")]
    cache_dir: Option<PathBuf>,

    /// Compile every component afresh, without the on-disk cache.
    #[arg(long, conflicts_with = "cache_dir")]
    no_cache: bool,

    /// Let JetStream triggers create a missing stream (file storage, subjects
    /// from the trigger's `filter`).
    #[arg(long, env = "NATSFN_CREATE_STREAMS")]
    create_streams: bool,

    /// A KV bucket to create if missing: `NAME[:history=N,ttl=SECS,max_bytes=N,storage=file|memory]`.
    /// Repeat for several.
    #[arg(long = "kv-bucket", value_name = "SPEC", value_parser = |s: &str| BucketSpec::parse(BucketKind::Kv, s))]
    kv_buckets: Vec<BucketSpec>,

    /// An object bucket to create if missing: `NAME[:ttl=SECS,max_bytes=N,storage=file|memory]`.
    #[arg(long = "object-bucket", value_name = "SPEC", value_parser = |s: &str| BucketSpec::parse(BucketKind::Object, s))]
    object_buckets: Vec<BucketSpec>,

    /// Instances alive at once across all handlers (the instance pool size).
    /// [default: the host config's `max_instances`, else 256]
    #[arg(long, value_name = "N", env = "NATSFN_MAX_INSTANCES")]
    max_instances: Option<u32>,

    #[command(flatten)]
    tracing: TracingArgs,
}

/// OpenTelemetry tracing. Off unless an endpoint is given here or in
/// `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`; the
/// other standard `OTEL_*` variables apply (headers, timeout, service name,
/// `OTEL_SDK_DISABLED`...). Flags win over variables.
#[derive(Debug, Clone, clap::Args)]
struct TracingArgs {
    /// OTLP collector base URL (like OTEL_EXPORTER_OTLP_ENDPOINT), e.g.
    /// http://localhost:4318 for HTTP or http://localhost:4317 for gRPC.
    /// Setting it turns tracing on.
    #[arg(long, value_name = "URL")]
    otlp_endpoint: Option<String>,

    /// OTLP transport: grpc or http/protobuf [default: OTEL_EXPORTER_OTLP_PROTOCOL,
    /// else http/protobuf].
    #[arg(long, value_name = "PROTOCOL")]
    otlp_protocol: Option<Protocol>,

    /// Sampler: always_on, always_off, traceidratio, parentbased_always_on,
    /// parentbased_always_off, parentbased_traceidratio [default:
    /// OTEL_TRACES_SAMPLER, else parentbased_always_on].
    #[arg(long, value_name = "NAME")]
    trace_sampler: Option<String>,

    /// The sampler's ratio, 0 to 1, for the *traceidratio samplers.
    #[arg(long, value_name = "RATIO", requires = "trace_sampler")]
    trace_sampler_arg: Option<String>,
}

impl TracingArgs {
    /// The OTLP pipeline these flags and the environment ask for, if any.
    fn pipeline(&self) -> Result<Option<OtlpPipeline>, TelemetryError> {
        let mut otlp = Otlp::from_env()?;
        if let Some(url) = &self.otlp_endpoint {
            otlp = otlp.endpoint(url.clone());
        }
        if let Some(protocol) = self.otlp_protocol {
            otlp = otlp.protocol(protocol);
        }
        if let Some(name) = &self.trace_sampler {
            otlp = otlp.sampler(Sampler::from_settings(
                name,
                self.trace_sampler_arg.as_deref(),
                ("--trace-sampler", "--trace-sampler-arg"),
            )?);
        }
        if !otlp.is_configured() {
            return Ok(None);
        }
        otlp.build().map(Some)
    }
}

impl Cli {
    /// Parses the process arguments, runs the command, and returns the exit
    /// code: 0 on success, 1 when handlers failed validation, 2 when the host
    /// could not run at all.
    pub fn run_from_env() -> ExitCode {
        let cli = Cli::parse();
        let otlp = match &cli.command {
            Command::Run(args) | Command::Dev(args) => match args.tracing.pipeline() {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("natsfn: {e}");
                    return ExitCode::from(2);
                }
            },
            _ => None,
        };
        // A benchmark's output is its table: only warnings interrupt it.
        let default_filter = if matches!(cli.command, Command::Bench(_)) { "warn" } else { "info" };
        crate::telemetry::init(default_filter);
        if let Some(p) = &otlp {
            println!("natsfn: tracing on, exporting spans over OTLP {}", p.protocol());
        }
        let mut runtime = tokio::runtime::Builder::new_multi_thread();
        if let Some(n) = cli.threads {
            runtime.worker_threads(n.into());
        }
        let runtime = match runtime.enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("natsfn: cannot start the async runtime: {e}");
                return ExitCode::from(2);
            }
        };
        let tracer = otlp.as_ref().map(OtlpPipeline::tracer);
        let code = match cli.command {
            Command::Run(args) => runtime.block_on(run(args, tracer)),
            Command::Dev(args) => runtime.block_on(run(RunArgs { watch: true, ..args }, tracer)),
            Command::Validate(dirs) => runtime.block_on(validate(dirs)),
            Command::Request(args) => runtime.block_on(send(args, true)),
            Command::Publish(args) => runtime.block_on(send(args, false)),
            Command::Bench(args) => runtime.block_on(bench(args)),
        };
        // The host has stopped: the last invocation spans are ended and get
        // exported now (errors are logged, never fatal).
        if let Some(p) = otlp {
            p.shutdown();
        }
        code
    }
}

async fn run(args: RunArgs, tracer: Option<Tracer>) -> ExitCode {
    let config = match args.config.as_deref().map(HostConfig::load).transpose() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("natsfn: {e}");
            return ExitCode::from(2);
        }
    };
    if args.handlers.dirs.is_empty() && config.as_ref().is_none_or(|c| c.handlers.is_empty()) {
        eprintln!("natsfn: no handlers directory: give --handlers DIR (or `handlers` in the host config)");
        return ExitCode::from(2);
    }
    // Kept alive for the whole run: dropping it stops the server.
    let (url, local) = match server_or_local(args.nats.or_else(|| config.as_ref().and_then(|c| c.nats.clone()))) {
        Ok(found) => found,
        Err(e) => {
            eprintln!("natsfn: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(server) = &local {
        println!("natsfn: started local nats-server at {url} (JetStream store {})", server.store_dir().display());
    }

    let mut builder = Host::builder();
    if let Some(tracer) = tracer {
        builder = builder.tracer(tracer);
    }
    if let Some(config) = config {
        builder = builder.config(config);
    }
    if !args.no_cache {
        if let Some(dir) = args.cache_dir.or_else(default_cache_dir) {
            builder = builder.cache_dir(dir);
        }
    }
    for spec in args.kv_buckets.into_iter().chain(args.object_buckets) {
        builder = builder.bucket(spec);
    }
    if let Some(n) = args.max_instances {
        builder = builder.max_instances(n);
    }
    let built = builder
        .nats_url(&url)
        .handlers_dir_all(args.handlers.dirs)
        .create_streams(args.create_streams)
        .shutdown_timeout(Duration::from_secs(args.shutdown_timeout))
        .build()
        .await;
    let host = match built {
        Ok(host) => host,
        Err(e) => {
            eprintln!("natsfn: {e}");
            return ExitCode::from(2);
        }
    };
    for e in host.load_errors() {
        eprintln!("natsfn: skipped: {e}");
    }
    if host.handlers().is_empty() && !args.watch {
        eprintln!("natsfn: no handler could be loaded, nothing to run (use --watch to wait for some)");
        return ExitCode::from(2);
    }
    let host_errors = host.load_errors().len();
    let running = match host.start().await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("natsfn: {e}");
            return ExitCode::from(2);
        }
    };
    for e in running.load_errors().iter().skip(host_errors) {
        eprintln!("natsfn: not started: {e}");
    }
    if running.handlers().is_empty() && !args.watch {
        eprintln!("natsfn: no handler could be started, nothing to run");
        running.shutdown().await;
        return ExitCode::from(2);
    }
    for (h, _) in running.stats() {
        let triggers: Vec<String> = h.triggers.iter().map(ToString::to_string).collect();
        println!(
            "natsfn: serving {} (tenant {}, version {}) on {}",
            h.name,
            h.tenant,
            &h.version[..12],
            triggers.join(", ")
        );
    }
    if args.watch {
        let watching = running.watch(print_reload);
        match watching {
            Ok(()) => println!("natsfn: watching for changes"),
            Err(e) => {
                eprintln!("natsfn: {e}");
                running.shutdown().await;
                return ExitCode::from(2);
            }
        }
    }
    let signals = Signals::register();
    let workers = tokio::runtime::Handle::current().metrics().num_workers();
    println!("natsfn: ready, nats {url}, worker threads: {workers}");

    let signal = signals.serve_until_stopped(&running).await;
    println!("natsfn: {signal} received, shutting down");
    let report = running.shutdown().await;
    drop(local);
    if report.clean {
        ExitCode::SUCCESS
    } else {
        if report.abandoned > 0 {
            eprintln!("natsfn: shutdown abandoned {} invocations at the deadline", report.abandoned);
        } else {
            eprintln!("natsfn: shutdown was not clean: NATS did not confirm the last messages (see the log)");
        }
        ExitCode::from(1)
    }
}

/// The server at `nats`, or a local one started now (kept alive by the
/// returned handle: dropping it stops the server).
fn server_or_local(
    nats: Option<String>,
) -> Result<(String, Option<NatsServer>), crate::local_server::LocalServerError> {
    match nats {
        Some(url) => Ok((url, None)),
        None => NatsServer::start().map(|server| (server.url(), Some(server))),
    }
}

async fn bench(args: BenchArgs) -> ExitCode {
    use crate::bench::{self, Machine, Mode, Report, Scenario};
    if args.handlers.dirs.is_empty() {
        eprintln!("natsfn: bench: give --handlers DIR");
        return ExitCode::from(2);
    }
    let (url, local) = match server_or_local(args.nats) {
        Ok(found) => found,
        Err(e) => {
            eprintln!("natsfn: {e}");
            return ExitCode::from(2);
        }
    };
    let scenario = Scenario {
        name: args.name,
        mode: match args.mode {
            BenchMode::Publish => Mode::Publish,
            BenchMode::Request => Mode::Request,
            BenchMode::Jetstream => Mode::JetStream { stream: args.stream },
        },
        subject: args.subject,
        payload_size: args.payload_size,
        messages: args.messages.max(1),
        concurrency: args.concurrency.max(1),
        output: args.output,
    };
    let (dirs, max_instances) = (args.handlers.dirs, args.max_instances);
    let host = || Host::builder().handlers_dir_all(dirs.clone()).max_instances(max_instances);
    let measured = async {
        let machine = Machine::detect(&url).await?;
        let server = local.as_ref().map_or_else(|| bench::Server::at(&url), bench::Server::local);
        let result = bench::run(&server, &scenario, args.rounds, host).await?;
        let instance_costs = match args.instance_iterations {
            0 => Vec::new(),
            n => bench::handlers_instance_cost(&url, &dirs, n).await?,
        };
        Ok::<_, bench::BenchError>(Report { machine, scenarios: vec![result], instance_costs, idle: None })
    };
    let code = match measured.await {
        Ok(report) => {
            print!("{}", report.table());
            match args.json.map(|path| report.write_json(&path)) {
                Some(Err(e)) => {
                    eprintln!("natsfn: {e}");
                    ExitCode::from(2)
                }
                _ => ExitCode::SUCCESS,
            }
        }
        Err(e) => {
            eprintln!("natsfn: bench: {e}");
            ExitCode::from(1)
        }
    };
    drop(local);
    code
}

async fn validate(args: ValidateArgs) -> ExitCode {
    let mut dirs = args.handlers.dirs;
    if let Some(path) = &args.config {
        match HostConfig::load(path) {
            Ok(config) => {
                println!("ok: host config {} ({} tenants)", path.display(), config.tenants.len());
                dirs.extend(config.handlers);
            }
            Err(e) => {
                println!("error: {e}");
                return ExitCode::from(1);
            }
        }
    }
    if dirs.is_empty() {
        eprintln!("natsfn: nothing to validate: give --handlers DIR or --config FILE");
        return ExitCode::from(2);
    }
    match crate::host::validate(&dirs).await {
        Ok((ok, errors)) => {
            for h in &ok {
                println!("ok: {} (tenant {}) from {}", h.name, h.tenant, h.origin.display());
            }
            for e in &errors {
                println!("error: {e}");
            }
            if errors.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("natsfn: {e}");
            ExitCode::from(2)
        }
    }
}

async fn send(args: SendArgs, request: bool) -> ExitCode {
    let client = match async_nats::connect(&args.nats).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("natsfn: cannot connect to {}: {e}", args.nats);
            return ExitCode::from(2);
        }
    };
    let payload = args.payload.into_bytes().into();
    let result = if request {
        let req = async_nats::Request::new().payload(payload).timeout(Some(Duration::from_secs(args.timeout)));
        client
            .send_request(args.subject.clone(), req)
            .await
            .map(|reply| {
                println!("{}", String::from_utf8_lossy(&reply.payload));
            })
            .map_err(|e| e.to_string())
    } else {
        match client.publish(args.subject.clone(), payload).await {
            Ok(()) => client.flush().await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("natsfn: {}: {e}", args.subject);
            ExitCode::from(1)
        }
    }
}

/// `$XDG_CACHE_HOME/natsfn`, else `~/.cache/natsfn`.
fn default_cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("natsfn"))
}

/// Prints what a reload changed, one line per handler.
fn print_reload(report: &crate::ReloadReport) {
    for c in &report.changes {
        let version = c.version.get(..12).unwrap_or("-");
        println!(
            "natsfn: {:?} {} (tenant {}) version {version}: compile {:.1} ms{}, swap {:.1} ms",
            c.kind,
            c.handler,
            c.tenant,
            c.compile.as_secs_f64() * 1e3,
            match c.cache {
                Some(crate::engine::CacheOutcome::Hit) => " (cached)",
                Some(crate::engine::CacheOutcome::Shared) => " (shared with a loaded handler)",
                _ => "",
            },
            c.swap.as_secs_f64() * 1e3,
        );
    }
    for e in &report.errors {
        println!("natsfn: reload error, previous version keeps serving: {e}");
    }
}

/// The signals that stop (SIGINT, SIGTERM) or reload (SIGHUP) a running
/// host.
///
/// They are registered before the host prints "ready", not when it starts
/// waiting for them: until a handler is registered a SIGTERM has its default
/// action and kills the process outright, with no drain and exit status
/// none. A supervisor, or a test, that signals as soon as it reads "ready"
/// must find the handlers already in place, however late the main task is
/// scheduled after that line. (Elsewhere than Unix only Ctrl-C stops the
/// host, and it is awaited as tokio offers it.)
struct Signals {
    #[cfg(unix)]
    interrupt: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    terminate: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    hangup: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    /// Registers the handlers; one that cannot be registered is warned about
    /// and leaves that signal's default action in place.
    fn register() -> Signals {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let register = |kind: SignalKind, name: &str, instead: &str| match signal(kind) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!("cannot listen for {name}, {instead}: {e}");
                    None
                }
            };
            Signals {
                interrupt: register(SignalKind::interrupt(), "SIGINT", "stop natsfn with SIGTERM"),
                terminate: register(SignalKind::terminate(), "SIGTERM", "stop natsfn with SIGINT"),
                hangup: register(SignalKind::hangup(), "SIGHUP", "reload with --watch instead"),
            }
        }
        #[cfg(not(unix))]
        Signals {}
    }

    /// Serves until SIGINT or SIGTERM, which it names. A SIGHUP on the way
    /// re-reads the handler directories, as daemons conventionally do, for
    /// deployments that replace files without `--watch`.
    async fn serve_until_stopped(mut self, running: &crate::RunningHost) -> &'static str {
        #[cfg(unix)]
        loop {
            tokio::select! {
                () = recv(&mut self.interrupt) => return "SIGINT",
                () = recv(&mut self.terminate) => return "SIGTERM",
                () = recv(&mut self.hangup) => {
                    println!("natsfn: SIGHUP received, reloading handlers");
                    print_reload(&running.reload().await);
                }
            }
        }
        #[cfg(not(unix))]
        {
            let _ = running;
            let _ = tokio::signal::ctrl_c().await;
            "SIGINT"
        }
    }
}

/// The next delivery of a registered signal; never, for one that is not
/// registered, or once the runtime's signal driver is gone (a `None` from
/// `recv`), so that `select!` always has a branch left to wait on.
#[cfg(unix)]
async fn recv(signal: &mut Option<tokio::signal::unix::Signal>) {
    if let Some(s) = signal {
        if s.recv().await.is_some() {
            return;
        }
    }
    std::future::pending().await
}
