//! The sections about the process itself: `[serve]` (its roles, shutdown
//! and health), `[node]` (its name and lease among several) and `[http]`
//! (its status server), with [`Roles`] as `--role` and the config write
//! them. Each checks its own bounds; none starts anything.

use super::hostname;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeConfig {
    /// What this process does: trainer, encoder, or both.
    pub roles: Roles,
    /// After the shutdown signal, how long the daemon still tries to reach NATS.
    pub shutdown_grace_secs: u64,
    /// `/healthz` fails when a role's loop has not gone round for this long.
    pub heartbeat_max_age_secs: u64,
}

impl ServeConfig {
    pub fn validate(&self) -> Result<()> {
        if self.shutdown_grace_secs == 0 {
            bail!("serve.shutdown_grace_secs must be at least 1");
        }
        if !(self.roles.trainer || self.roles.encoder) {
            bail!("serve.roles must name at least one role: trainer, encoder");
        }
        if self.heartbeat_max_age_secs < 5 {
            bail!("serve.heartbeat_max_age_secs must be at least 5 (idle loops beat every second)");
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// This node's name among several ("" for a single node).
    pub id: String,
    /// The training lease lapses this long after its last renewal.
    pub lease_ttl_secs: u64,
}

impl NodeConfig {
    /// Who holds the lease, as its value says: the node id, or this
    /// machine's hostname when there is none.
    pub fn holder(&self) -> String {
        if self.id.is_empty() {
            hostname()
        } else {
            self.id.clone()
        }
    }

    pub fn validate(&self) -> Result<()> {
        check_lease_ttl(self.lease_ttl_secs).context("node.lease_ttl_secs")?;
        if self
            .id
            .contains(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
        {
            bail!("node.id may hold only letters, digits, '-' and '_' (it names a consumer)");
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Where /metrics, /healthz and the status page listen ("" turns HTTP off).
    pub addr: String,
    /// Requests served at once; more get 503 at once, but /healthz and
    /// /metrics, always answered (idle connections are bounded apart).
    pub max_connections: usize,
    /// The status page reloads itself every this many seconds (0: never).
    pub refresh_secs: u64,
}

impl HttpConfig {
    pub fn validate(&self) -> Result<()> {
        if self.max_connections == 0 {
            bail!("http.max_connections must be at least 1");
        }
        Ok(())
    }
}

/// The roles of one `wmvae serve` process, written `trainer`, `encoder` or
/// `trainer,encoder` (config, `--role`, `WMVAE_SERVE__ROLES`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Roles {
    /// Ingest into the replay buffer, training, checkpoints, checkpoint control.
    pub trainer: bool,
    /// A latent per frame from the stream, and the `encode` endpoint.
    pub encoder: bool,
}

impl std::str::FromStr for Roles {
    type Err = anyhow::Error;

    fn from_str(text: &str) -> Result<Roles> {
        let mut roles = Roles {
            trainer: false,
            encoder: false,
        };
        for role in text.split(',').map(str::trim) {
            match role {
                "trainer" => roles.trainer = true,
                "encoder" => roles.encoder = true,
                other => bail!("unknown role {other:?} (roles: trainer, encoder, or trainer,encoder)"),
            }
        }
        Ok(roles)
    }
}

impl std::fmt::Display for Roles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = [(self.trainer, "trainer"), (self.encoder, "encoder")]
            .into_iter()
            .filter(|r| r.0)
            .map(|r| r.1)
            .collect();
        f.write_str(&names.join(","))
    }
}

impl Serialize for Roles {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Roles {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> std::result::Result<Roles, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// A lease TTL a cluster may have: at least 3 s (the lease is renewed
/// every third of it, and one renewal may take a second).
pub fn check_lease_ttl(seconds: u64) -> Result<()> {
    if seconds < 3 {
        bail!("a lease TTL must be at least 3 seconds (renewed every third of it), not {seconds}");
    }
    Ok(())
}
