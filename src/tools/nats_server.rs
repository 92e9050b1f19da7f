//! A local nats-server child process with JetStream (`sync_interval:
//! always`) on a free loopback port and its own store directory, for
//! benches and tests. The server is killed when this is dropped.
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
    _dir: tempfile::TempDir,
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
        let dir = tempfile::tempdir()?;
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let conf = dir.path().join("nats.conf");
        let store = dir.path().join("js");
        let log = dir.path().join("nats.log");
        std::fs::write(&conf, format!(
                "listen: 127.0.0.1:{port}\njetstream {{ store_dir: {store:?}, sync_interval: always, max_file_store: {MAX_FILE_STORE_BYTES} }}\n{extra}\n"
            ))?;
        let child = Command::new(binary)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("starting {} (run scripts/setup)", binary.display()))?;
        let mut server = LocalNats { child, url: format!("nats://127.0.0.1:{port}"), _dir: dir };
        let deadline = Instant::now() + START_TIMEOUT;
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = server.child.try_wait()? {
                let said = std::fs::read_to_string(&log).unwrap_or_default();
                bail!("nats-server exited at start ({status}): {}", said.trim());
            }
            if Instant::now() > deadline {
                bail!("nats-server did not listen on port {port} within {START_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(server)
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
