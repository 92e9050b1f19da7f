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
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        Self::start_on(binary, port, extra)
    }

    fn start_on(binary: &Path, port: u16, extra: &str) -> Result<LocalNats> {
        let dir = tempfile::tempdir()?;
        let store = dir.path().join("js");
        std::fs::write(dir.path().join("nats.conf"), format!(
                "listen: 127.0.0.1:{port}\njetstream {{ store_dir: {store:?}, sync_interval: always, max_file_store: {MAX_FILE_STORE_BYTES} }}\n{extra}\n"
            ))?;
        let child = spawn(binary, dir.path(), port)?;
        Ok(LocalNats { child, url: format!("nats://127.0.0.1:{port}"), port, binary: binary.to_owned(), dir })
    }

    /// SIGKILL: the server gets no chance to step down or flush.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
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

/// A JetStream cluster of local nats-servers on one host, for tests.
pub struct LocalCluster {
    pub servers: Vec<LocalNats>,
}

impl LocalCluster {
    /// `n` servers, each with its own `server_name`, client and cluster
    /// ports and store, routed to one another.
    pub fn start(binary: &Path, n: usize) -> Result<LocalCluster> {
        let ports = (0..n).map(|_| Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())).collect::<Result<Vec<u16>>>()?;
        let routes: Vec<String> = ports.iter().map(|p| format!("nats-route://127.0.0.1:{p}")).collect();
        let servers = ports
            .iter()
            .enumerate()
            .map(|(i, port)| {
                let extra = format!("server_name: n{}\ncluster {{ name: wmvae, listen: 127.0.0.1:{port}, routes: [{}] }}", i + 1, routes.join(", "));
                LocalNats::start_with(binary, &extra)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(LocalCluster { servers })
    }

    /// The server with `server_name` `name` (as JetStream names a stream's leader).
    pub fn named(&mut self, name: &str) -> Option<&mut LocalNats> {
        let index: usize = name.strip_prefix('n')?.parse().ok()?;
        self.servers.get_mut(index.checked_sub(1)?)
    }

    /// Every server's URL, comma-separated, as `[nats] url` takes them.
    pub fn url(&self) -> String {
        self.servers.iter().map(|s| s.url.as_str()).collect::<Vec<_>>().join(",")
    }
}

impl Drop for LocalNats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
