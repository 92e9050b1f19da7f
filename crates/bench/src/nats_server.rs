//! A local nats-server child process with JetStream (`sync_interval:
//! always`) on a free loopback port and its own store directory, for
//! benches and tests, and a cluster of them; a server can be SIGKILLed and
//! restarted on the same port, with its store or without. Killed when dropped.
//!
//! Process management only: clients connect through `bus`.

use anyhow::{bail, Context, Result};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a fresh server may take to listen.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Starts tried before giving up when a port picked free was taken by
/// someone else (another test) before the server bound it.
const PORT_CLASH_TRIES: usize = 4;
/// JetStream's file-store limit. Left unset, the server derives it from the
/// disk's free space, and the streams' `max_bytes` (WM_FRAMES alone
/// reserves 8 GiB) are refused as "insufficient storage resources" on a
/// disk with less than ~14 GB free. These servers hold a few MB.
const MAX_FILE_STORE_BYTES: u64 = 64 << 30;

pub struct LocalNats {
    child: Child,
    pub url: String,
    port: u16,
    binary: PathBuf,
    dir: tempfile::TempDir,
}

/// The venv's nats-server beside the working directory, else the one on PATH.
pub fn default_binary() -> PathBuf {
    let venv = Path::new(".venv/bin/nats-server");
    if venv.exists() {
        venv.to_owned()
    } else {
        PathBuf::from("nats-server")
    }
}

impl LocalNats {
    pub fn start(binary: &Path) -> Result<LocalNats> {
        Self::start_with(binary, "")
    }

    /// As [`LocalNats::start`], with `extra` appended to the server's
    /// config (authorization, TLS, operator mode ...).
    pub fn start_with(binary: &Path, extra: &str) -> Result<LocalNats> {
        retry_port_clash(|| Self::start_on(binary, free_ports(1)?[0], extra))
    }

    fn start_on(binary: &Path, port: u16, extra: &str) -> Result<LocalNats> {
        let dir = tempfile::tempdir()?;
        let store = dir.path().join("js");
        std::fs::write(
            dir.path().join("nats.conf"),
            format!(
                "listen: 127.0.0.1:{port}\nmax_payload: 4MB\njetstream {{ store_dir: {store:?}, sync_interval: always, \
                    max_file_store: {MAX_FILE_STORE_BYTES} }}\n{extra}\n"
            ),
        )?;
        let child = spawn(binary, dir.path(), port)?;
        Ok(LocalNats {
            child,
            url: format!("nats://127.0.0.1:{port}"),
            port,
            binary: binary.to_owned(),
            dir,
        })
    }

    /// SIGKILL: the server gets no chance to step down or flush.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM: the server shuts down cleanly (stepping down, flushing);
    /// returns once it has exited.
    pub fn terminate(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SAFETY: kill only sends a signal to our own child.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let _ = self.child.wait();
    }

    /// Starts the server again on the same port, config and store (after
    /// [`LocalNats::kill`]).
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.child = spawn(&self.binary, self.dir.path(), self.port)?;
        Ok(())
    }

    /// Kills the server, deletes its JetStream store and starts it again
    /// on the same port: a server that came back without its state.
    pub fn restart_empty(&mut self) -> Result<()> {
        self.kill();
        std::fs::remove_dir_all(self.dir.path().join("js")).context("deleting the JetStream store")?;
        self.restart()
    }
}

/// Runs nats-server on `dir`'s config until it listens on `port`.
fn spawn(binary: &Path, dir: &Path, port: u16) -> Result<Child> {
    let log = dir.join("nats.log");
    let mut child = Command::new(binary)
        .arg("-c")
        .arg(dir.join("nats.conf"))
        .stdout(Stdio::null())
        .stderr(std::fs::OpenOptions::new().create(true).append(true).open(&log)?)
        .spawn()
        .with_context(|| format!("starting {} (run scripts/setup)", binary.display()))?;
    let deadline = Instant::now() + START_TIMEOUT;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(status) = child.try_wait()? {
            let said = std::fs::read_to_string(&log).unwrap_or_default();
            bail!("nats-server exited at start ({status}): {}", said.trim());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("nats-server did not listen on port {port} within {START_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(child)
}

/// `n` distinct loopback ports that were free a moment ago (the listeners
/// are held until all are picked, then closed for the server to bind).
fn free_ports(n: usize) -> Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()?;
    Ok(listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<std::io::Result<Vec<_>>>()?)
}

/// Runs `start` again, with fresh ports, while it fails because a port was
/// taken between picking and binding; any other failure is returned.
fn retry_port_clash<T>(mut start: impl FnMut() -> Result<T>) -> Result<T> {
    let mut tries = 1;
    loop {
        match start() {
            Err(e) if tries < PORT_CLASH_TRIES && format!("{e:#}").contains("address already in use") => tries += 1,
            other => return other,
        }
    }
}

/// A JetStream cluster of local nats-servers on one host, for tests.
pub struct LocalCluster {
    pub servers: Vec<LocalNats>,
}

impl LocalCluster {
    /// `n` servers, each with its own `server_name`, client and cluster
    /// ports and store, routed to one another.
    pub fn start(binary: &Path, n: usize) -> Result<LocalCluster> {
        retry_port_clash(|| {
            // Client and route ports picked together, so no two coincide.
            let ports = free_ports(2 * n)?;
            let (clients, cluster) = ports.split_at(n);
            let routes: Vec<String> = cluster.iter().map(|p| format!("nats-route://127.0.0.1:{p}")).collect();
            let servers = (0..n)
                .map(|i| {
                    let extra = format!(
                        "server_name: n{}\ncluster {{ name: wmvae, listen: 127.0.0.1:{}, routes: [{}] }}",
                        i + 1,
                        cluster[i],
                        routes.join(", ")
                    );
                    LocalNats::start_on(binary, clients[i], &extra)
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(LocalCluster { servers })
        })
    }

    /// The server with `server_name` `name` (as JetStream names a stream's leader).
    pub fn named(&mut self, name: &str) -> Option<&mut LocalNats> {
        let index: usize = name.strip_prefix('n')?.parse().ok()?;
        self.servers.get_mut(index.checked_sub(1)?)
    }

    /// Every server's URL, comma-separated, as `[nats] url` takes them.
    pub fn url(&self) -> String {
        self.servers
            .iter()
            .map(|s| s.url.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }
}

impl Drop for LocalNats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
