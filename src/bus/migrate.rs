//! Applies `migrations/*.toml`: creates or updates the streams, the durable
//! consumer and the object bucket they declare, with the limits the config
//! sets, and refuses what a newer wmvae shaped. Names of the streams and
//! consumers the rest of `bus` opens come from here.

use super::Bus;
use crate::config::Config;
use anyhow::{bail, Context, Result};
use async_nats::jetstream::{self, consumer::pull, stream};
use serde::Deserialize;
use std::collections::HashMap;
use std::time::Duration;

/// Migration files, in order. Adding one means adding it here.
const MIGRATIONS: &[(&str, &str)] = &[
    ("0001_frames.toml", include_str!("../../migrations/0001_frames.toml")),
    (
        "0002_training.toml",
        include_str!("../../migrations/0002_training.toml"),
    ),
    (
        "0003_checkpoint_chunks.toml",
        include_str!("../../migrations/0003_checkpoint_chunks.toml"),
    ),
    (
        "0004_frame_chunks.toml",
        include_str!("../../migrations/0004_frame_chunks.toml"),
    ),
    ("0005_encoder.toml", include_str!("../../migrations/0005_encoder.toml")),
    ("0006_cluster.toml", include_str!("../../migrations/0006_cluster.toml")),
    ("0007_fences.toml", include_str!("../../migrations/0007_fences.toml")),
];
/// The frame stream (migration 0001).
pub(super) const FRAMES_STREAM: &str = "WM_FRAMES";

/// Messages the server pushes per ingest pull request: enough to keep a
/// group commit full, small enough that a slow store holds few of them.
const INGEST_PULL_BATCH: usize = 1024;
/// ... per encoder pull request: a default micro-batch (`[latents]
/// max_batch`), so each replica holds at most about one batch unacked.
const ENCODE_PULL_BATCH: usize = 64;

/// The durable consumers that read WM_FRAMES.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameConsumer {
    /// `wmvae-ingest` (migration 0001): a single trainer node's replay buffer.
    Ingest,
    /// `wmvae-ingest-<node id>`: trainer node `<node id>`'s, made like
    /// `wmvae-ingest` when the node first starts, so every trainer node
    /// (leader and standbys) keeps its own buffer current.
    IngestFor(String),
    /// `wmvae-encode` (migration 0005): shared by the encoder replicas.
    Encode,
}

impl FrameConsumer {
    /// Messages each pull asks for. Ingest wants a group commit's worth;
    /// encoders a micro-batch's, so frames spread over the replicas
    /// instead of piling up, unacked, at the first to ask.
    pub(super) fn pull_batch(&self) -> usize {
        match self {
            FrameConsumer::Ingest | FrameConsumer::IngestFor(_) => INGEST_PULL_BATCH,
            FrameConsumer::Encode => ENCODE_PULL_BATCH,
        }
    }

    /// The ingest consumer of the trainer node `[node] id` (none: `wmvae-ingest`).
    pub fn ingest(node_id: &str) -> FrameConsumer {
        match node_id {
            "" => FrameConsumer::Ingest,
            id => FrameConsumer::IngestFor(id.to_string()),
        }
    }

    pub fn durable_name(&self) -> String {
        match self {
            FrameConsumer::Ingest => "wmvae-ingest".into(),
            FrameConsumer::IngestFor(id) => format!("wmvae-ingest-{id}"),
            FrameConsumer::Encode => "wmvae-encode".into(),
        }
    }
}
/// Stream metadata key recording the migration that shaped a stream.
const MIGRATION_METADATA_KEY: &str = "wmvae_migration";
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Migration {
    version: u64,
    store_schema: u64,
    #[serde(default)]
    stream: Vec<StreamDef>,
    #[serde(default)]
    consumer: Vec<ConsumerDef>,
    #[serde(default)]
    object_store: Vec<ObjectStoreDef>,
    #[serde(default)]
    kv: Vec<KvDef>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KvDef {
    bucket: String,
    description: String,
    /// The lease bucket: one value a key, its max age the lease TTL, expiry
    /// shown as a purge marker.
    lease: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ObjectStoreDef {
    bucket: String,
    description: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamDef {
    name: String,
    subjects: Vec<String>,
    description: String,
    max_age_secs: u64,
    max_bytes: i64,
    duplicate_window_secs: u64,
    /// Take max age and bytes from the config's `[latents]` instead.
    #[serde(default)]
    limits_from_config: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConsumerDef {
    stream: String,
    durable: String,
}

fn migrations() -> Result<Vec<Migration>> {
    MIGRATIONS
        .iter()
        .map(|(name, text)| toml::from_str(text).with_context(|| format!("migrations/{name}")))
        .collect()
}

/// The newest store schema the migrations declare (the store checks it).
pub fn latest_store_schema() -> Result<u64> {
    Ok(migrations()?.iter().map(|m| m.store_schema).max().unwrap_or(0))
}

/// What `migrate` did, for logs and `wmvae migrate`.
#[derive(Debug, Default)]
pub struct MigrationReport {
    pub version: u64,
    pub streams: Vec<String>,
    pub consumers: Vec<String>,
}

/// Limits the config sets on what `migrate` creates.
#[derive(Debug, Clone, Copy)]
pub struct BusLimits {
    /// Unacked frames are redelivered after this long (`[ingest]`).
    pub ack_wait_secs: u64,
    /// Frames handed out but not yet acked, at most (`[ingest]`).
    pub max_ack_pending: i64,
    /// Deliveries of one frame, at most, on each durable consumer (`[ingest]`).
    pub max_deliver: i64,
    /// WM_LATENTS keeps latents this long (`[latents]`).
    pub latents_max_age_secs: u64,
    /// ... and at most this many bytes.
    pub latents_max_bytes: i64,
    /// `num_replicas` of everything (`[nats] replicas`).
    pub replicas: usize,
    /// The training lease's TTL (`[node] lease_ttl_secs`) for a lease
    /// bucket made now; an existing one keeps its own.
    pub lease_ttl_secs: u64,
}

impl BusLimits {
    /// The limits of `config`'s `[ingest]` and `[latents]` sections.
    pub fn from_config(config: &Config) -> BusLimits {
        BusLimits {
            ack_wait_secs: config.ingest.ack_wait_secs,
            max_ack_pending: config.ingest.max_ack_pending,
            max_deliver: config.ingest.max_deliver,
            latents_max_age_secs: config.latents.stream_max_age_secs,
            latents_max_bytes: config.latents.stream_max_bytes,
            replicas: config.nats.replicas,
            lease_ttl_secs: config.node.lease_ttl_secs,
        }
    }
}

impl Bus {
    /// Applies every migration: creates or updates streams and consumers.
    pub async fn migrate(&self) -> Result<MigrationReport> {
        let mut report = MigrationReport::default();
        let migrations = migrations()?;
        for (i, migration) in migrations.iter().enumerate() {
            // A stream a later migration defines again is applied once, as that one says.
            let redefined = |name: &str| {
                migrations[i + 1..]
                    .iter()
                    .any(|m| m.stream.iter().any(|s| s.name == name))
            };
            for def in migration.stream.iter().filter(|def| !redefined(&def.name)) {
                self.apply_stream(def, migration.version).await?;
                report.streams.push(def.name.clone());
            }
            for def in &migration.object_store {
                self.apply_object_store(def).await?;
                report.streams.push(format!("OBJ_{}", def.bucket));
            }
            for def in &migration.kv {
                self.apply_kv(def).await?;
                report.streams.push(format!("KV_{}", def.bucket));
            }
            for def in &migration.consumer {
                self.apply_consumer(def).await?;
                report.consumers.push(format!("{}/{}", def.stream, def.durable));
            }
            report.version = migration.version;
        }
        Ok(report)
    }

    async fn apply_stream(&self, def: &StreamDef, version: u64) -> Result<()> {
        if let Ok(mut existing) = self.js.get_stream(&def.name).await {
            let info = existing
                .info()
                .await
                .with_context(|| format!("reading stream {}", def.name))?;
            let theirs = info
                .config
                .metadata
                .get(MIGRATION_METADATA_KEY)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
            let newest = migrations()?.iter().map(|m| m.version).max().unwrap_or(0);
            if theirs > newest {
                bail!(
                    "stream {} was shaped by migration {theirs} of a newer wmvae; this build knows up to {newest}",
                    def.name
                );
            }
        }
        let config = stream::Config {
            name: def.name.clone(),
            subjects: def
                .subjects
                .iter()
                .map(|s| s.replace("{prefix}", &self.prefix))
                .collect(),
            description: Some(def.description.clone()),
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::Limits,
            discard: stream::DiscardPolicy::Old,
            max_age: Duration::from_secs(if def.limits_from_config {
                self.limits.latents_max_age_secs
            } else {
                def.max_age_secs
            }),
            max_bytes: if def.limits_from_config {
                self.limits.latents_max_bytes
            } else {
                def.max_bytes
            },
            max_messages: -1,
            max_messages_per_subject: -1,
            duplicate_window: Duration::from_secs(def.duplicate_window_secs),
            num_replicas: self.limits.replicas,
            metadata: HashMap::from([(MIGRATION_METADATA_KEY.to_string(), version.to_string())]),
            ..Default::default()
        };
        self.js
            .create_or_update_stream(config)
            .await
            .with_context(|| format!("applying stream {}", def.name))?;
        Ok(())
    }

    async fn apply_object_store(&self, def: &ObjectStoreDef) -> Result<()> {
        if self.js.get_object_store(&def.bucket).await.is_ok() {
            return self.apply_replicas(&format!("OBJ_{}", def.bucket)).await;
        }
        let config = jetstream::object_store::Config {
            bucket: def.bucket.clone(),
            description: Some(def.description.clone()),
            storage: stream::StorageType::File,
            num_replicas: self.limits.replicas,
            ..Default::default()
        };
        self.js
            .create_object_store(config)
            .await
            .with_context(|| format!("creating object store {}", def.bucket))?;
        Ok(())
    }

    async fn apply_kv(&self, def: &KvDef) -> Result<()> {
        let max_age = if def.lease {
            Duration::from_secs(self.limits.lease_ttl_secs)
        } else {
            Duration::ZERO
        };
        // An existing bucket keeps its max age: the lease's TTL is the
        // cluster's, set here once and then only by `wmvae cluster set
        // lease-ttl` (a node's own `[node] lease_ttl_secs` never rewrites it).
        if self.js.get_key_value(&def.bucket).await.is_ok() {
            return self.apply_replicas(&format!("KV_{}", def.bucket)).await;
        }
        let config = jetstream::kv::Config {
            bucket: def.bucket.clone(),
            description: def.description.clone(),
            history: 1,
            max_age,
            storage: stream::StorageType::File,
            num_replicas: self.limits.replicas,
            limit_markers: def.lease.then_some(max_age),
            ..Default::default()
        };
        self.js
            .create_key_value(config)
            .await
            .with_context(|| format!("creating KV bucket {}", def.bucket))?;
        Ok(())
    }

    /// Sets the cluster's lease TTL (`wmvae cluster set lease-ttl`): the
    /// lease bucket's max age, and its expiry markers' age, in place; the
    /// TTL it had before. A leader reads it within a second. The server
    /// ages the held key by the new TTL at once, and a leader renews every
    /// third of the old one: a TTL not above a third of the old plus a
    /// second could end the holding (a failover) and is refused: shorten
    /// in steps.
    pub async fn set_lease_ttl(&self, ttl: Duration) -> Result<Duration> {
        let name = format!("KV_{}", super::kv::LEASE_BUCKET);
        let mut config = self.stream_info(&name).await?.config;
        let before = config.max_age;
        let shortest = before / 3 + Duration::from_secs(1);
        if ttl <= shortest {
            bail!(
                "a lease TTL of {ttl:?} could lapse the lease now held (renewed every {:?}): shorten it in steps, each \
                longer than {shortest:?} from a TTL of {before:?}",
                before / 3
            );
        }
        config.max_age = ttl;
        config.subject_delete_marker_ttl = config.subject_delete_marker_ttl.map(|_| ttl);
        // The server refuses a duplicate window longer than the max age.
        config.duplicate_window = config.duplicate_window.min(ttl);
        self.js
            .update_stream(config)
            .await
            .with_context(|| format!("updating stream {name}"))?;
        Ok(before)
    }

    /// Brings an existing stream (a bucket's) to the configured replicas:
    /// an update in place, never a re-create; its max age is left alone.
    async fn apply_replicas(&self, name: &str) -> Result<()> {
        let mut config = self.stream_info(name).await?.config;
        if config.num_replicas == self.limits.replicas {
            return Ok(());
        }
        config.num_replicas = self.limits.replicas;
        self.js
            .update_stream(config)
            .await
            .with_context(|| format!("updating stream {name}"))?;
        Ok(())
    }

    /// Makes a node's own consumer (`IngestFor`) like the migrations' ones;
    /// the others exist once `migrate` ran.
    pub(super) async fn ensure_consumer(&self, which: &FrameConsumer) -> Result<()> {
        match which {
            FrameConsumer::IngestFor(_) => {
                self.apply_consumer(&ConsumerDef {
                    stream: FRAMES_STREAM.into(),
                    durable: which.durable_name(),
                })
                .await
            }
            FrameConsumer::Ingest | FrameConsumer::Encode => Ok(()),
        }
    }

    async fn apply_consumer(&self, def: &ConsumerDef) -> Result<()> {
        let config = pull::Config {
            durable_name: Some(def.durable.clone()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(self.limits.ack_wait_secs),
            max_ack_pending: self.limits.max_ack_pending,
            max_deliver: self.limits.max_deliver,
            ..Default::default()
        };
        let stream = self
            .js
            .get_stream(&def.stream)
            .await
            .with_context(|| format!("stream {}", def.stream))?;
        let what = || format!("applying consumer {}/{}", def.stream, def.durable);
        match stream.get_consumer::<pull::Config>(&def.durable).await {
            Ok(_) => self
                .js
                .update_consumer_on_stream(config, &def.stream)
                .await
                .map(drop)
                .with_context(what),
            Err(_) => self
                .js
                .create_consumer_on_stream(config, &def.stream)
                .await
                .map(drop)
                .with_context(what),
        }
    }
}

#[cfg(test)]
mod tests {
    /// The migrations declare the store schema this build writes.
    #[test]
    fn migrations_declare_this_builds_store_schema() {
        assert_eq!(super::latest_store_schema().unwrap(), crate::store::SCHEMA_VERSION);
    }

    /// The stream and consumer the feed opens are the ones the migrations make.
    #[test]
    fn migrations_define_the_frame_stream_and_its_consumer() {
        let all = super::migrations().unwrap();
        assert!(all
            .iter()
            .flat_map(|m| &m.stream)
            .any(|s| s.name == super::FRAMES_STREAM));
        for consumer in [super::FrameConsumer::ingest(""), super::FrameConsumer::Encode] {
            assert!(all
                .iter()
                .flat_map(|m| &m.consumer)
                .any(|c| c.stream == super::FRAMES_STREAM && c.durable == consumer.durable_name()));
        }
        let buckets: Vec<&str> = all.iter().flat_map(|m| &m.kv).map(|k| k.bucket.as_str()).collect();
        assert_eq!(buckets, ["wm-lease", "wm-meta"], "the buckets bus::kv opens");
    }
}
