//! Network namespaces for a local cluster whose servers can be cut from
//! one another: each server runs in its own namespace with two links, one
//! to this host for its clients (a veth pair, a /30 of its own) and one to
//! a bridge that only the servers share, for their routes. Cutting a
//! server's route link partitions it from its peers while its clients
//! stay connected to it: the minority side of a split, as a switch that
//! fails between racks makes it. Healing sets the link up again; the
//! routes' TCP connections resume where they stalled.
//!
//! Linux, root (`CAP_NET_ADMIN`) and iproute2's `ip` only; [`available`]
//! says whether this host allows it. Names carry this process's id, so
//! runs side by side do not meet, and what a killed run left behind is
//! removed by the next one. Starting processes inside stays in
//! `nats_server`: this module only lays the wires.

use anyhow::{bail, Context, Result};
use std::process::Command;

/// The names' common prefix: `wm<pid>b` (the route bridge), `wm<pid>n<i>`
/// (server i's namespace), `wm<pid>r<i>` and `wm<pid>c<i>` (this host's
/// end of its route and client links). Interface names fit Linux's 15
/// bytes for any pid.
const PREFIX: &str = "wm";

/// The servers' route addresses, inside their namespaces only (this host
/// holds none on the bridge, so they meet nothing of its own).
const ROUTE_NET: &str = "192.168.77";

pub struct Network {
    pid: u32,
    servers: usize,
    /// `10.a.b`: this run's client /24, one /30 per server.
    client_net: String,
}

/// Whether this host lets us make network namespaces (root with
/// `CAP_NET_ADMIN`, iproute2 installed); the reason when not.
pub fn available() -> Result<()> {
    let probe = format!("{PREFIX}{}probe", std::process::id());
    ip(&["netns", "add", &probe]).context("network namespaces are not available here")?;
    ip(&["netns", "del", &probe])
}

impl Network {
    /// A namespace per server, their route links on one bridge, their
    /// client links to this host; what dead runs left is removed first.
    pub fn create(servers: usize) -> Result<Network> {
        remove_leftovers()?;
        let pid = std::process::id();
        let id = pid % 65_536;
        let network = Network {
            pid,
            servers,
            client_net: format!("10.{}.{}", id >> 8, id & 0xff),
        };
        // Dropped (and so removed) when laying fails halfway.
        network.lay()?;
        Ok(network)
    }

    fn lay(&self) -> Result<()> {
        let bridge = self.name('b', None);
        ip(&["link", "add", &bridge, "type", "bridge"])?;
        ip(&["link", "set", &bridge, "up"])?;
        for i in 0..self.servers {
            let ns = self.namespace(i);
            let (route, client) = (self.name('r', Some(i)), self.name('c', Some(i)));
            ip(&["netns", "add", &ns])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&[
                "link", "add", &route, "type", "veth", "peer", "name", "r0", "netns", &ns,
            ])?;
            ip(&["link", "set", &route, "master", &bridge, "up"])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", self.route_ip(i)),
                "dev",
                "r0",
            ])?;
            ip(&["-n", &ns, "link", "set", "r0", "up"])?;
            ip(&[
                "link", "add", &client, "type", "veth", "peer", "name", "c0", "netns", &ns,
            ])?;
            ip(&[
                "addr",
                "add",
                &format!("{}.{}/30", self.client_net, 4 * i + 1),
                "dev",
                &client,
            ])?;
            ip(&["link", "set", &client, "up"])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/30", self.client_ip(i)),
                "dev",
                "c0",
            ])?;
            ip(&["-n", &ns, "link", "set", "c0", "up"])?;
        }
        Ok(())
    }

    /// Server `i`'s namespace, for `ip netns exec`.
    pub fn namespace(&self, i: usize) -> String {
        format!("{PREFIX}{}n{i}", self.pid)
    }

    /// Where server `i` listens for clients (reachable from this host).
    pub fn client_ip(&self, i: usize) -> String {
        format!("{}.{}", self.client_net, 4 * i + 2)
    }

    /// Where server `i` listens for routes (reachable from its peers only).
    pub fn route_ip(&self, i: usize) -> String {
        format!("{ROUTE_NET}.{}", i + 1)
    }

    /// Cuts server `i` from its peers (its clients keep it).
    pub fn cut(&self, i: usize) -> Result<()> {
        ip(&["link", "set", &self.name('r', Some(i)), "down"])
    }

    /// Joins server `i` to its peers again.
    pub fn heal(&self, i: usize) -> Result<()> {
        ip(&["link", "set", &self.name('r', Some(i)), "up"])
    }

    fn name(&self, kind: char, i: Option<usize>) -> String {
        format!(
            "{PREFIX}{}{kind}{}",
            self.pid,
            i.map(|i| i.to_string()).unwrap_or_default()
        )
    }

    /// Deleting a namespace deletes the links in it and so their peers
    /// here; the bridge goes by itself. Processes still inside are
    /// killed first (the servers' owner kills them before this).
    fn remove(&self) {
        for i in 0..self.servers {
            remove_namespace(&self.namespace(i));
        }
        let _ = ip(&["link", "del", &self.name('b', None)]);
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Namespaces and bridges named after a process that is gone (a run
/// killed before its drop): removed, with any server left inside.
fn remove_leftovers() -> Result<()> {
    let dead = |name: &str| {
        let digits: String = name
            .strip_prefix(PREFIX)
            .unwrap_or_default()
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        !digits.is_empty() && !std::path::Path::new(&format!("/proc/{digits}")).exists()
    };
    for ns in output(&["netns", "list"])?
        .lines()
        .filter_map(|l| l.split_whitespace().next())
    {
        if dead(ns) {
            remove_namespace(ns);
        }
    }
    for line in output(&["-o", "link", "show", "type", "bridge"])?.lines() {
        // "7: wm123b: <BROADCAST,...": the name is the second field.
        if let Some(name) = line.split(": ").nth(1).and_then(|n| n.split('@').next()) {
            if dead(name) {
                let _ = ip(&["link", "del", name]);
            }
        }
    }
    Ok(())
}

/// Kills what runs in namespace `ns`, then deletes it.
fn remove_namespace(ns: &str) {
    if let Ok(pids) = output(&["netns", "pids", ns]) {
        for pid in pids.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
            // SAFETY: kill only sends a signal, to a process in a namespace we made.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    let _ = ip(&["netns", "del", ns]);
}

fn ip(args: &[&str]) -> Result<()> {
    output(args).map(drop)
}

/// Runs `ip args`; its stdout, or why it failed.
fn output(args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
