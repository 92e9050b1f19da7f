//! The one configuration: `config/default.toml` compiled in as the defaults,
//! an optional file on top, then environment variables
//! `WMVAE_<SECTION>__<KEY>` (e.g. `WMVAE_TRAIN__BATCH_SIZE=64`) on top of
//! that. Unknown keys are errors, so a typo never silently does nothing.
//! This module parses and validates; it opens no connections.
//!
//! Over 400 lines for one concern: every section's type with its keys
//! documented, the loading, and the checks of every bound.

use crate::vae::adam::{AdamConfig, Schedule};
use crate::vae::device::DeviceChoice;
use crate::vae::model::{Precision, VaeConfig};
use crate::frames::preprocess::Policy;
use crate::store::BufferConfig;
use std::path::PathBuf;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The documented defaults, shipped in the binary so it runs without files.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");
/// Prefix of overriding environment variables.
const ENV_PREFIX: &str = "WMVAE_";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub nats: NatsConfig,
    pub serve: ServeConfig,
    pub node: NodeConfig,
    pub store: StoreConfig,
    pub buffer: BufferConfig,
    pub ingest: IngestConfig,
    pub latents: LatentsConfig,
    pub http: HttpConfig,
    pub model: VaeConfig,
    pub train: TrainConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    /// Server URL(s), comma-separated; credentials never go in here.
    pub url: String,
    /// `num_replicas` of every stream, the object store and the KV buckets.
    pub replicas: usize,
    /// First token of every subject: `<prefix>.frames.<source>`, ...
    pub prefix: String,
    /// At most one way to authenticate: `user` + `password`, `token`,
    /// `nkey_seed` or `creds_file` ("" is unset).
    pub user: String,
    pub password: Secret,
    pub token: Secret,
    /// An nkey user seed (`SU...`); the server knows its public key.
    pub nkey_seed: Secret,
    /// A `.creds` file (user JWT + seed) for operator-mode servers.
    pub creds_file: String,
    /// The CA that signed the server's certificate; setting it requires TLS.
    pub tls_ca_file: String,
    /// A client certificate and its key, for servers that verify clients.
    pub tls_cert_file: String,
    pub tls_key_file: String,
    /// The subject this client's replies come to: `<inbox_prefix>.<id>`. A
    /// shared server gives each user its own (`_INBOX_<user>`, as
    /// config/nats-permissions.conf does), so no one reads another's replies.
    pub inbox_prefix: String,
    /// The daemon's control service on its own connection, as this user
    /// ("" is unset: on the main connection). In an account of its own,
    /// which exports `<prefix>.ctl.>` to the callers' account with `share`,
    /// each request names the user the server authenticated, and that is
    /// the `by` of what it changes (config/nats-permissions.conf).
    pub control_user: String,
    pub control_password: Secret,
}

impl NatsConfig {
    /// How this config authenticates, in words safe to log.
    pub fn auth_kind(&self) -> &'static str {
        if self.password.is_set() {
            "user/password"
        } else if self.token.is_set() {
            "token"
        } else if self.nkey_seed.is_set() {
            "nkey"
        } else if !self.creds_file.is_empty() {
            "creds file"
        } else if !self.tls_cert_file.is_empty() {
            "TLS client certificate"
        } else {
            "none"
        }
    }

    fn validate(&self) -> Result<()> {
        for server in self.url.split(',') {
            let authority = server.split_once("://").map_or(server, |(_, rest)| rest);
            if authority.split('/').next().unwrap_or_default().contains('@') {
                bail!("nats.url must not carry credentials: set nats.user and nats.password (or WMVAE_NATS__PASSWORD) so they stay out of logs");
            }
        }
        let ways = [self.password.is_set(), self.token.is_set(), self.nkey_seed.is_set(), !self.creds_file.is_empty()];
        if ways.iter().filter(|&&set| set).count() > 1 {
            bail!("nats: set at most one of password, token, nkey_seed and creds_file");
        }
        if self.user.is_empty() == self.password.is_set() {
            bail!("nats.user and nats.password go together");
        }
        if self.control_user.is_empty() == self.control_password.is_set() {
            bail!("nats.control_user and nats.control_password go together");
        }
        if let Some(seed) = self.nkey_seed.expose() {
            if nkeys::KeyPair::from_seed(seed).is_err() || !seed.starts_with("SU") {
                bail!("nats.nkey_seed is not an nkey user seed (it starts with \"SU\")");
            }
        }
        if self.tls_cert_file.is_empty() != self.tls_key_file.is_empty() {
            bail!("nats.tls_cert_file and nats.tls_key_file go together");
        }
        for (key, path) in [
            ("creds_file", &self.creds_file),
            ("tls_ca_file", &self.tls_ca_file),
            ("tls_cert_file", &self.tls_cert_file),
            ("tls_key_file", &self.tls_key_file),
        ] {
            if !path.is_empty() && !Path::new(path).is_file() {
                bail!("nats.{key}: no file at {path}");
            }
        }
        Ok(())
    }
}

/// A credential from the config or the environment: handed to the NATS
/// client, shown nowhere else. Its `Debug` and `Serialize` write
/// `<redacted>`, so logs, `--check-config` and the config saved in
/// checkpoint metadata never carry it.
#[derive(Clone, Default, PartialEq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    const SHOWN_AS: &'static str = "<redacted>";

    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    pub fn is_set(&self) -> bool {
        !self.0.is_empty()
    }

    /// The value, for the one place that hands it to the NATS client.
    pub fn expose(&self) -> Option<&str> {
        self.is_set().then_some(self.0.as_str())
    }

    fn shown(&self) -> &'static str {
        if self.is_set() { Self::SHOWN_AS } else { "" }
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.shown())
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        serializer.serialize_str(self.shown())
    }
}

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
        if self.id.is_empty() { hostname() } else { self.id.clone() }
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
        let mut roles = Roles { trainer: false, encoder: false };
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
        let names: Vec<&str> = [(self.trainer, "trainer"), (self.encoder, "encoder")].into_iter().filter(|r| r.0).map(|r| r.1).collect();
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
        String::deserialize(deserializer)?.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// Where the sled store lives (created if missing).
    pub data_dir: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestConfig {
    /// "world_models" (64x64 as is, 96x96 cropped and resized, others
    /// rejected) or "resize" (others resized too).
    pub preprocess: Policy,
    /// Frames per group commit (one flush, then their acks).
    pub batch_max_frames: usize,
    /// Longest wait for a group to fill once its first frame is in.
    pub batch_max_wait_ms: u64,
    /// Unacked frames are redelivered after this many seconds.
    pub ack_wait_secs: u64,
    /// Frames handed out but not yet acked, at most (backpressure).
    pub max_ack_pending: i64,
    /// Deliveries of one frame, at most, on each consumer; past them the
    /// frame is dead-lettered as `undeliverable`.
    pub max_deliver: i64,
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LatentsConfig {
    /// Frames encoded together, at most.
    pub max_batch: usize,
    /// Longest wait for a micro-batch to fill once its first frame is in.
    pub max_wait_ms: u64,
    /// WM_LATENTS keeps latents this long (seconds) ...
    pub stream_max_age_secs: u64,
    /// ... and at most this many bytes.
    pub stream_max_bytes: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub device: DeviceChoice,
    /// The training step's arithmetic: `fp32`, or `bf16` layers over
    /// float32 weights, optimizer and loss.
    pub precision: Precision,
    pub batch_size: usize,
    /// Adam's (peak) learning rate.
    pub learning_rate: f64,
    /// How it moves with the step: `constant` (the paper) or `warmup_cosine`.
    pub lr_schedule: Schedule,
    /// `warmup_cosine`: steps of linear warmup, then steps of cosine decay
    /// down to `min_learning_rate`, which holds after.
    pub warmup_steps: u64,
    pub decay_steps: u64,
    pub min_learning_rate: f64,
    /// libtorch intra-op threads; 0 keeps libtorch's default (one per core).
    pub threads: usize,
    /// Training starts once the training split holds this many frames.
    pub min_frames: u64,
    /// Frames trained on per frame inserted, at most (0: unlimited).
    pub samples_per_insert: f64,
    pub eval_every_steps: u64,
    pub log_every_steps: u64,
    /// A loss above this times the running median is skipped.
    pub divergence_factor: f64,
    /// Skipped steps in a row that trigger an automatic rollback.
    pub max_bad_steps: usize,
    /// Automatic rollbacks in a row before training stops with an error.
    pub max_auto_rollbacks: u32,
    pub checkpoint_every_steps: u64,
    /// While the model is young, versions (and evals) also at this step
    /// and each doubling of it below `checkpoint_every_steps` (0: none).
    pub first_checkpoint_steps: u64,
    /// Newest versions kept by retention (besides pinned, best and active).
    pub keep_last: usize,
}

impl TrainConfig {
    /// Whether `step` is one of the young model's extra versions and
    /// evals: `first_checkpoint_steps` x 1, 2, 4, ... below `checkpoint_every_steps`.
    pub fn is_early_checkpoint(&self, step: u64) -> bool {
        let first = self.first_checkpoint_steps;
        first > 0 && step < self.checkpoint_every_steps && step % first == 0 && (step / first).is_power_of_two()
    }
}

impl Config {
    /// Defaults, then `file` if given, then the environment.
    pub fn load(file: Option<&Path>) -> Result<Config> {
        Self::load_with_env(file, std::env::vars())
    }

    /// As [`Config::load`], with the environment passed in (for tests).
    pub fn load_with_env(file: Option<&Path>, env: impl IntoIterator<Item = (String, String)>) -> Result<Config> {
        let mut merged: toml::Table = DEFAULT_TOML.parse().context("built-in config/default.toml")?;
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
            let table: toml::Table = text.parse().with_context(|| format!("parsing config {}", path.display()))?;
            merge(&mut merged, table, path)?;
        }
        for (key, value) in env {
            let Some(rest) = key.strip_prefix(ENV_PREFIX) else { continue };
            let Some((section, field)) = rest.split_once("__") else { continue };
            let (section, field) = (section.to_lowercase(), field.to_lowercase());
            let Some(toml::Value::Table(table)) = merged.get_mut(&section) else {
                bail!("{key}: no config section [{section}]");
            };
            if !table.contains_key(&field) {
                bail!("{key}: no key {field:?} in config section [{section}]");
            }
            // A key whose default is a string stays a string ("1234" as a password).
            let value = match table.get(&field) {
                Some(toml::Value::String(_)) => toml::Value::String(value),
                _ => parse_env_value(&value),
            };
            table.insert(field, value);
        }
        let config: Config = toml::Value::Table(merged).try_into().context("invalid configuration")?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every bound and combination; `load` calls it, and so must
    /// whoever changes a loaded config.
    pub fn validate(&self) -> Result<()> {
        if self.nats.prefix.is_empty() || self.nats.prefix.contains(['.', '*', '>', ' ']) {
            bail!("nats.prefix must be one subject token (no '.', '*', '>' or spaces)");
        }
        if self.nats.inbox_prefix.is_empty() || self.nats.inbox_prefix.contains(['.', '*', '>', ' ']) {
            bail!("nats.inbox_prefix must be one subject token (no '.', '*', '>' or spaces), such as _INBOX_operator");
        }
        self.nats.validate()?;
        if !(1..=5).contains(&self.nats.replicas) {
            bail!("nats.replicas must be in 1..=5 (JetStream's limit)");
        }
        if self.http.max_connections == 0 {
            bail!("http.max_connections must be at least 1");
        }
        if self.node.lease_ttl_secs < 3 {
            bail!("node.lease_ttl_secs must be at least 3 (renewed every third of it)");
        }
        if self.node.id.contains(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_')) {
            bail!("node.id may hold only letters, digits, '-' and '_' (it names a consumer)");
        }
        if self.serve.shutdown_grace_secs == 0 {
            bail!("serve.shutdown_grace_secs must be at least 1");
        }
        if !(self.serve.roles.trainer || self.serve.roles.encoder) {
            bail!("serve.roles must name at least one role: trainer, encoder");
        }
        self.buffer.validate()?;
        if self.ingest.batch_max_frames == 0 || self.ingest.batch_max_frames > MAX_INGEST_BATCH {
            bail!("ingest.batch_max_frames must be in 1..={MAX_INGEST_BATCH}");
        }
        if self.ingest.batch_max_wait_ms > 10_000 {
            bail!("ingest.batch_max_wait_ms must be at most 10000");
        }
        if self.ingest.ack_wait_secs == 0 {
            bail!("ingest.ack_wait_secs must be at least 1");
        }
        if self.serve.heartbeat_max_age_secs < 5 {
            bail!("serve.heartbeat_max_age_secs must be at least 5 (idle loops beat every second)");
        }
        if self.ingest.max_deliver < 2 {
            bail!("ingest.max_deliver must be at least 2 (one delivery and one retry)");
        }
        if self.ingest.max_ack_pending < self.ingest.batch_max_frames as i64 {
            bail!("ingest.max_ack_pending must be at least ingest.batch_max_frames");
        }
        self.model.validate()?;
        if self.train.batch_size == 0 || self.train.batch_size > MAX_BATCH_SIZE {
            bail!("train.batch_size must be in 1..={MAX_BATCH_SIZE}");
        }
        if !(self.train.learning_rate > 0.0 && self.train.learning_rate.is_finite()) {
            bail!("train.learning_rate must be a positive number");
        }
        if self.train.lr_schedule == Schedule::WarmupCosine {
            if self.train.decay_steps == 0 {
                bail!("train.decay_steps must be at least 1 with lr_schedule = \"warmup_cosine\"");
            }
            if !(self.train.min_learning_rate >= 0.0 && self.train.min_learning_rate <= self.train.learning_rate) {
                bail!("train.min_learning_rate must be between 0 and train.learning_rate");
            }
        }
        for (name, value) in [
            ("eval_every_steps", self.train.eval_every_steps),
            ("log_every_steps", self.train.log_every_steps),
            ("checkpoint_every_steps", self.train.checkpoint_every_steps),
            ("max_bad_steps", self.train.max_bad_steps as u64),
            ("max_auto_rollbacks", self.train.max_auto_rollbacks as u64),
            ("keep_last", self.train.keep_last as u64),
        ] {
            if value == 0 {
                bail!("train.{name} must be at least 1");
            }
        }
        if !(self.train.samples_per_insert >= 0.0 && self.train.samples_per_insert.is_finite()) {
            bail!("train.samples_per_insert must be 0 (unlimited) or positive");
        }
        // Written so that NaN fails as well.
        if !(self.train.divergence_factor > 1.0 && self.train.divergence_factor.is_finite()) {
            bail!("train.divergence_factor must be above 1");
        }
        if self.latents.max_batch == 0 || self.latents.max_batch > MAX_LATENT_BATCH {
            bail!("latents.max_batch must be in 1..={MAX_LATENT_BATCH}");
        }
        Ok(())
    }

    /// The `[model]` section (a copy).
    pub fn vae(&self) -> VaeConfig {
        self.model
    }

    /// The optimizer these `[train]` keys describe (betas and eps: the defaults).
    pub fn adam(&self) -> AdamConfig {
        let t = &self.train;
        AdamConfig {
            learning_rate: t.learning_rate,
            schedule: t.lr_schedule,
            warmup_steps: t.warmup_steps,
            decay_steps: t.decay_steps,
            min_learning_rate: t.min_learning_rate,
            ..AdamConfig::default()
        }
    }
}

/// This machine's name (the kernel's), for status replies and for who
/// made a change; "localhost" if it can't be read.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// Upper bound on a training batch: 4,096 frames are ~200 MB of float
/// activations per conv layer on the CPU, past what a 24 GiB box should spend.
pub const MAX_BATCH_SIZE: usize = 4096;

/// Upper bound on a group commit: 8,192 frames of 96x96 is ~230 MB of
/// decoded pixels in flight, the most one batch should hold.
pub const MAX_INGEST_BATCH: usize = 8192;

/// Upper bound on a latent micro-batch: encoding is latency-bound, and 1,024
/// frames already fill a GPU's encoder pass.
pub const MAX_LATENT_BATCH: usize = 1024;

/// `500` is an integer, `1e-4` a float, `true` a bool, anything else a string.
fn parse_env_value(raw: &str) -> toml::Value {
    match format!("v = {raw}").parse::<toml::Table>() {
        Ok(mut t) => t.remove("v").unwrap_or_else(|| toml::Value::String(raw.to_string())),
        Err(_) => toml::Value::String(raw.to_string()),
    }
}

/// Overlays `top` on `base`, section by section; unknown sections are errors.
fn merge(base: &mut toml::Table, top: toml::Table, origin: &Path) -> Result<()> {
    for (section, value) in top {
        let Some(toml::Value::Table(base_section)) = base.get_mut(&section) else {
            bail!("{}: unknown config section [{section}]", origin.display());
        };
        let toml::Value::Table(fields) = value else {
            bail!("{}: [{section}] must be a table", origin.display());
        };
        base_section.extend(fields);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse() {
        let c = Config::load_with_env(None, []).unwrap();
        assert_eq!(c.model.z_size, 32);
        assert_eq!(c.train.batch_size, 100);
    }

    #[test]
    fn environment_overrides_and_typos_fail() {
        let env = [("WMVAE_TRAIN__BATCH_SIZE".to_string(), "64".to_string()), ("WMVAE_TRAIN__DEVICE".into(), "cpu".into())];
        let c = Config::load_with_env(None, env).unwrap();
        assert_eq!((c.train.batch_size, c.train.device), (64, DeviceChoice::Cpu));
        let err = Config::load_with_env(None, [("WMVAE_TRAIN__BATCH_SIZ".to_string(), "1".to_string())]).unwrap_err();
        assert!(err.to_string().contains("no key \"batch_siz\""), "{err}");
        assert!(Config::load_with_env(None, [("WMVAE_TRAIN__BATCH_SIZE".to_string(), "0".to_string())]).is_err());
    }

    #[test]
    fn roles_parse_from_the_environment_and_refuse_typos() {
        let c = Config::load_with_env(None, []).unwrap();
        assert_eq!(c.serve.roles, Roles { trainer: true, encoder: true });
        assert_eq!(c.serve.roles.to_string(), "trainer,encoder");
        let c = Config::load_with_env(None, [("WMVAE_SERVE__ROLES".to_string(), "encoder".to_string())]).unwrap();
        assert_eq!(c.serve.roles, Roles { trainer: false, encoder: true });
        let err = format!("{:#}", Config::load_with_env(None, [("WMVAE_SERVE__ROLES".to_string(), "trainer,encodr".to_string())]).unwrap_err());
        assert!(err.contains("unknown role \"encodr\""), "{err}");
        assert!(Config::load_with_env(None, [("WMVAE_SERVE__ROLES".to_string(), "".to_string())]).is_err());
    }

    #[test]
    fn file_overlays_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[train]\nlearning_rate = 0.001\n").unwrap();
        let c = Config::load_with_env(Some(&path), []).unwrap();
        assert_eq!(c.train.learning_rate, 0.001);
        assert_eq!(c.train.batch_size, 100);
        std::fs::write(&path, "[trian]\nx = 1\n").unwrap();
        assert!(Config::load_with_env(Some(&path), []).unwrap_err().to_string().contains("unknown config section [trian]"));
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn secrets_never_print() {
        let c = Config::load_with_env(None, env(&[("WMVAE_NATS__USER", "alice"), ("WMVAE_NATS__PASSWORD", "1234"), ("WMVAE_NATS__CONTROL_USER", "ctl"), ("WMVAE_NATS__CONTROL_PASSWORD", "5678")])).unwrap();
        // A numeric-looking password stays a string, exactly as given.
        assert_eq!(c.nats.password.expose(), Some("1234"));
        assert_eq!(c.nats.auth_kind(), "user/password");
        for shown in [format!("{c:?}"), toml::to_string(&c).unwrap(), serde_json::to_string(&c).unwrap()] {
            assert!(!shown.contains("1234") && !shown.contains("5678"), "{shown}");
            assert!(shown.contains("<redacted>"), "{shown}");
        }
    }

    #[test]
    fn early_checkpoints_double_until_the_cadence() {
        let c = Config::load_with_env(None, env(&[("WMVAE_TRAIN__FIRST_CHECKPOINT_STEPS", "50")])).unwrap();
        let early: Vec<u64> = (1..=5000).filter(|&s| c.train.is_early_checkpoint(s)).collect();
        assert_eq!(early, [50, 100, 200, 400, 800]);
        assert!(!(1..=5000).any(|s| Config::load(None).unwrap().train.is_early_checkpoint(s)), "off by default");
    }

    #[test]
    fn auth_settings_are_checked() {
        let refused = |pairs: &[(&str, &str)], says: &str| {
            let err = format!("{:#}", Config::load_with_env(None, env(pairs)).unwrap_err());
            assert!(err.contains(says), "{err}");
            assert!(!err.contains("hunter2"), "{err}");
        };
        refused(&[("WMVAE_NATS__URL", "nats://bob:hunter2@host:4222")], "must not carry credentials");
        refused(&[("WMVAE_NATS__TOKEN", "hunter2"), ("WMVAE_NATS__USER", "bob"), ("WMVAE_NATS__PASSWORD", "hunter2")], "at most one");
        refused(&[("WMVAE_NATS__PASSWORD", "hunter2")], "go together");
        refused(&[("WMVAE_NATS__CONTROL_PASSWORD", "hunter2")], "control_user and nats.control_password go together");
        refused(&[("WMVAE_NATS__NKEY_SEED", "hunter2")], "not an nkey user seed");
        refused(&[("WMVAE_NATS__CREDS_FILE", "/nonexistent/x.creds")], "no file at /nonexistent/x.creds");
        refused(&[("WMVAE_NATS__TLS_CERT_FILE", "/etc/hostname")], "go together");
        let seed = nkeys::KeyPair::new_user().seed().unwrap();
        let c = Config::load_with_env(None, env(&[("WMVAE_NATS__NKEY_SEED", &seed)])).unwrap();
        assert_eq!(c.nats.auth_kind(), "nkey");
    }
}
