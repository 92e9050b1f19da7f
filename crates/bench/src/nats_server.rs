//! A local nats-server child process with JetStream (`sync_interval:
//! always`) on a free loopback port and its own store directory, for
//! benches and tests, and a cluster of them; a server can be SIGKILLed and
//! restarted on the same port, with its store or without. Killed when dropped.
//! A cluster can run each server in its own network namespace (`netns`),
//! so that one can be partitioned from the others.
//!
//! Process management only: clients connect through `bus`.

use crate::netns::Network;
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
    /// Where it listens for clients.
    host: String,
    port: u16,
    /// The network namespace it runs in, if not this host's.
    namespace: Option<String>,
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
        retry_port_clash(|| Self::start_on(binary, "127.0.0.1", free_ports(1)?[0], None, extra))
    }

    /// Listening on `host:port`, inside `namespace` if one is given.
    fn start_on(binary: &Path, host: &str, port: u16, namespace: Option<String>, extra: &str) -> Result<LocalNats> {
        let dir = tempfile::tempdir()?;
        let store = dir.path().join("js");
        std::fs::write(
            dir.path().join("nats.conf"),
            format!(
                "listen: {host}:{port}\nmax_payload: 4MB\njetstream {{ store_dir: {store:?}, sync_interval: always, \
                    max_file_store: {MAX_FILE_STORE_BYTES} }}\n{extra}\n"
            ),
        )?;
        Ok(LocalNats {
            child: spawn(binary, dir.path(), host, port, namespace.as_deref())?,
            url: format!("nats://{host}:{port}"),
            host: host.to_owned(),
            port,
            namespace,
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
        self.child = spawn(
            &self.binary,
            self.dir.path(),
            &self.host,
            self.port,
            self.namespace.as_deref(),
        )?;
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

/// Runs nats-server on `dir`'s config (inside `namespace`, if given)
/// until it listens on `host:port`; its log in `dir/nats.log`.
fn spawn(binary: &Path, dir: &Path, host: &str, port: u16, namespace: Option<&str>) -> Result<Child> {
    let log = dir.join("nats.log");
    // The log is appended to across restarts: this start is ready once it
    // holds one more "Server is ready" than now.
    let ready_before = ready_lines(&log);
    let mut command = match namespace {
        // `ip netns exec` execs the server: the child is the server itself.
        Some(ns) => {
            let mut command = Command::new("ip");
            command.args(["netns", "exec", ns]).arg(binary);
            command
        }
        None => Command::new(binary),
    };
    let mut child = command
        .arg("-c")
        .arg(dir.join("nats.conf"))
        .stdout(Stdio::null())
        .stderr(std::fs::OpenOptions::new().create(true).append(true).open(&log)?)
        .spawn()
        .with_context(|| format!("starting {} (run scripts/setup)", binary.display()))?;
    let deadline = Instant::now() + START_TIMEOUT;
    // Ready: listening, and by this process's own word (a port taken by
    // another test's server in the meantime answers the connect too, while
    // this one fails to bind and exits).
    while TcpStream::connect((host, port)).is_err() || ready_lines(&log) <= ready_before {
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

/// How many times the server log at `log` said it was ready.
fn ready_lines(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .map(|text| text.matches("Server is ready").count())
        .unwrap_or(0)
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
    /// The namespaces the servers run in, when they can be partitioned
    /// (dropped after the servers, which are killed first).
    network: Option<Network>,
}

/// The ports inside a server's own namespace: nothing else listens there.
const NAMESPACED_CLIENT_PORT: u16 = 4222;
const NAMESPACED_ROUTE_PORT: u16 = 6222;

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
                    LocalNats::start_on(binary, "127.0.0.1", clients[i], None, &extra)
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(LocalCluster { servers, network: None })
        })
    }

    /// As [`LocalCluster::start`], each server in its own network
    /// namespace (see `netns`), so that [`LocalCluster::cut`] can
    /// partition one from the others. Needs root and iproute2.
    pub fn start_partitionable(binary: &Path, n: usize) -> Result<LocalCluster> {
        let network = Network::create(n)?;
        let routes: Vec<String> = (0..n)
            .map(|i| format!("nats-route://{}:{NAMESPACED_ROUTE_PORT}", network.route_ip(i)))
            .collect();
        let servers = (0..n)
            .map(|i| {
                let extra = format!(
                    "server_name: n{}\ncluster {{ name: wmvae, listen: {}:{NAMESPACED_ROUTE_PORT}, routes: [{}] }}",
                    i + 1,
                    network.route_ip(i),
                    routes.join(", ")
                );
                let host = network.client_ip(i);
                LocalNats::start_on(
                    binary,
                    &host,
                    NAMESPACED_CLIENT_PORT,
                    Some(network.namespace(i)),
                    &extra,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(LocalCluster {
            servers,
            network: Some(network),
        })
    }

    /// Cuts server `i` from the other servers (its clients keep it), or
    /// joins it again (`cut` false). Only a partitionable cluster can.
    pub fn partition(&self, i: usize, cut: bool) -> Result<()> {
        let Some(network) = &self.network else {
            bail!("this cluster was not started partitionable");
        };
        if cut {
            network.cut(i)
        } else {
            network.heal(i)
        }
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
