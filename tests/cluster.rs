//! Beyond one machine, against real processes: a 3-node JetStream cluster
//! (three nats-servers on free ports, routed to one another) with
//! `[nats] replicas = 3`, two trainer nodes by lease; the leader SIGKILLed,
//! the standby takes over and trains on from the last announced version;
//! the leader paused past its TTL comes back as a standby and changes
//! nothing; `wmvae bench failover` (the WM_FRAMES leader's server, then the
//! leading trainer SIGKILLed) loses and duplicates nothing; and next to a
//! single-node default, a second trainer with its own id waits as a standby
//! and deletes nothing, while one without an id is refused.

mod common;

use async_nats::jetstream;
use common::nats::{announcements, stream_messages, wait_for_consumer, wait_until, Daemon, NatsServer};
use common::{frames, repo_root, wmvae, FAST};
use futures::StreamExt;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncReadExt;
use wmvae::bus::kv::Active;
use wmvae::bus::messages::{checkpoint_envelope_object, Announcement, CheckpointEvent, Fence};
use wmvae::frames::wire::FrameMessage;
use wmvae_bench::nats_server::LocalCluster;

/// A trainer node that makes versions quickly, with a short lease.
fn trainer_env(id: &'static str) -> Vec<(&'static str, &'static str)> {
    let node = [
        ("WMVAE_SERVE__ROLES", "trainer"),
        ("WMVAE_NODE__ID", id),
        ("WMVAE_NODE__LEASE_TTL_SECS", "3"),
        ("WMVAE_NATS__REPLICAS", "3"),
    ];
    FAST.iter().copied().chain(node).collect()
}

/// [`trainer_env`] for a single nats-server: no replicas.
fn single_server_env(id: &'static str) -> Vec<(&'static str, &'static str)> {
    trainer_env(id)
        .into_iter()
        .filter(|(k, _)| !k.starts_with("WMVAE_NATS__REPLICAS"))
        .collect()
}

/// A 3-node cluster with trainer `t1` leading and `t2` standing by, after
/// `versions` versions from t1.
async fn two_trainers(versions: usize) -> (LocalCluster, jetstream::Context, tempfile::TempDir, Daemon, Daemon) {
    let cluster = LocalCluster::start(&repo_root().join(".venv/bin/nats-server"), 3).unwrap();
    let url = cluster.url();
    let js = jetstream::new(async_nats::connect(cluster.servers[0].url.as_str()).await.unwrap());
    wait_until(Duration::from_secs(60), "the cluster's JetStream", || async {
        js.query_account().await.is_ok()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let first = Daemon::start(&url, &dir.path().join("t1"), &trainer_env("t1"));
    wait_until(Duration::from_secs(60), "t1 to lead", || async {
        lease_holder(&js).await.as_deref() == Some("t1")
    })
    .await;
    let second = Daemon::start(&url, &dir.path().join("t2"), &trainer_env("t2"));
    wait_for_consumer(&js, "wmvae-ingest-t2").await;
    publish(&js, 6, 25).await;
    wait_until(Duration::from_secs(120), "versions from t1", || async {
        created(&js).await.len() >= versions
    })
    .await;
    (cluster, js, dir, first, second)
}

async fn publish(js: &jetstream::Context, episodes: u64, steps: u64) {
    for (i, px) in frames((episodes * steps) as usize, 64, 64).chunks(12288).enumerate() {
        let msg = FrameMessage::rgb(format!("e{}", i as u64 / steps), i as u64 % steps, 64, 64, px);
        js.publish("wm.frames.car", msg.to_msgpack().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
}

async fn created(js: &jetstream::Context) -> Vec<Announcement> {
    announcements(js)
        .await
        .into_iter()
        .filter(|a| a.event == CheckpointEvent::Created)
        .collect()
}

async fn lease_holder(js: &jetstream::Context) -> Option<String> {
    let kv = js.get_key_value("wm-lease").await.ok()?;
    let entry = kv.entry("trainer").await.ok()??;
    (entry.operation == jetstream::kv::Operation::Put).then(|| String::from_utf8_lossy(&entry.value).into_owned())
}

/// The lease bucket's stream as the server holds it now.
async fn lease_bucket(js: &jetstream::Context) -> jetstream::stream::Info {
    js.get_stream("KV_wm-lease")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone()
}

/// Every node's status, as `$SRV.STATS.wmvae` carries it (the `status`
/// endpoint's `data`): node id to its `lease`, once `nodes` nodes answered
/// (or 15 s passed: a loaded box answers late, and one reply a second
/// apart from the next proved too tight beside a fresh-clone build).
async fn leases_by_node(
    js: &jetstream::Context,
    nodes: usize,
) -> std::collections::BTreeMap<String, serde_json::Value> {
    let client = js.client();
    let inbox = client.new_inbox();
    let mut replies = client.subscribe(inbox.clone()).await.unwrap();
    client
        .publish_with_reply("$SRV.STATS.wmvae", inbox, "".into())
        .await
        .unwrap();
    let mut leases = std::collections::BTreeMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while leases.len() < nodes {
        let Ok(Some(reply)) = tokio::time::timeout_at(deadline, replies.next()).await else {
            break;
        };
        let stats: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
        for status in stats["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| &e["data"])
            .filter(|d| !d.is_null())
        {
            leases.insert(status["node_id"].as_str().unwrap().to_string(), status["lease"].clone());
        }
    }
    leases
}

/// Both nodes' statuses reach a client on any server. The leading trainer
/// SIGKILLed: the standby takes the lease, resumes at the
/// last announced version's step, and announces higher versions; no version
/// number appears twice. While the active version's full checkpoint is
/// missing from the object store (as while its stream's leader is elected),
/// the takeover fails, is warned about and tried again, and succeeds once
/// it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standby_takes_over_when_the_leader_dies() {
    let (_cluster, js, _dir, first, second) = two_trainers(3).await;
    // Each node answers for itself, wherever its server is (a status request reaches the nearest node only).
    let expected = std::collections::BTreeMap::from([
        ("t1".to_string(), serde_json::json!("leader")),
        ("t2".to_string(), serde_json::json!("standby")),
    ]);
    assert_eq!(leases_by_node(&js, expected.len()).await, expected);

    first.kill();
    let before = created(&js).await;
    let last = before.last().unwrap().clone();
    let meta = js.get_key_value("wm-meta").await.unwrap();
    let active: Active = serde_json::from_slice(&meta.get("active").await.unwrap().unwrap()).unwrap();
    let objects = js.get_object_store("wm-checkpoints").await.unwrap();
    let name = checkpoint_envelope_object(active.version);
    let mut envelope = Vec::new();
    objects
        .get(&name)
        .await
        .unwrap()
        .read_to_end(&mut envelope)
        .await
        .unwrap();
    objects.delete(&name).await.unwrap();
    wait_until(Duration::from_secs(60), "t2 to fail taking over", || async {
        second.logs().contains("taking over training failed")
    })
    .await;
    objects.put(name.as_str(), &mut envelope.as_slice()).await.unwrap();
    wait_until(Duration::from_secs(60), "t2 to take the lease", || async {
        lease_holder(&js).await.as_deref() == Some("t2")
    })
    .await;
    wait_until(Duration::from_secs(120), "a version from t2", || async {
        created(&js)
            .await
            .iter()
            .any(|a| a.metadata.version > last.metadata.version)
    })
    .await;
    let after = created(&js).await;
    let next = after
        .iter()
        .find(|a| a.metadata.version > last.metadata.version)
        .unwrap();
    assert!(
        next.epoch > last.epoch,
        "the new leader's epoch {} is not above {}",
        next.epoch,
        last.epoch
    );
    // t1 may have made a version it never announced: the standby resumes from the last announced one.
    assert_eq!(
        next.metadata.parent,
        Some(last.metadata.version),
        "training goes on from the last announced version"
    );
    assert!(
        next.metadata.step > last.metadata.step,
        "step went from {} back to {}",
        last.metadata.step,
        next.metadata.step
    );
    let versions: Vec<u64> = after.iter().map(|a| a.metadata.version).collect();
    assert_eq!(
        versions.iter().collect::<HashSet<_>>().len(),
        versions.len(),
        "a version number appeared twice: {versions:?}"
    );
    assert!(
        second.logs().contains("resumed from the cluster's active version"),
        "{}",
        second.logs()
    );
    assert!(second.terminate().success());
}

/// The leader SIGSTOPped past its TTL, then SIGCONTed: the standby took
/// over, and nothing the old leader does after that is announced or becomes
/// `active` (what encoders follow); it sees by itself that it lost the lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_leader_comes_back_as_a_standby() {
    let (_cluster, js, _dir, first, second) = two_trainers(2).await;

    // Every value `active` takes from now on.
    let meta = js.get_key_value("wm-meta").await.unwrap();
    let mut watch = meta.watch_with_history("active").await.unwrap();
    let actives = Arc::new(Mutex::new(Vec::<Active>::new()));
    let seen = actives.clone();
    tokio::spawn(async move {
        while let Some(Ok(entry)) = watch.next().await {
            if let Ok(active) = serde_json::from_slice(&entry.value) {
                seen.lock().unwrap().push(active);
            }
        }
    });

    first.signal("STOP");
    let old_epoch = created(&js).await.last().unwrap().epoch;
    wait_until(Duration::from_secs(60), "t2 to take the lease", || async {
        lease_holder(&js).await.as_deref() == Some("t2")
    })
    .await;
    wait_until(Duration::from_secs(120), "a version from t2", || async {
        created(&js).await.iter().any(|a| a.epoch > old_epoch)
    })
    .await;
    first.signal("CONT");
    wait_until(Duration::from_secs(30), "t1 to see it lost the lease", || async {
        first.logs().contains("this node is a standby now") || first.logs().contains("lease: given up")
    })
    .await;
    // Time for anything t1 had queued to reach NATS, were it let through.
    tokio::time::sleep(Duration::from_secs(6)).await;

    let after = created(&js).await;
    let takeover = after.iter().position(|a| a.epoch > old_epoch).unwrap();
    assert!(
        after[takeover..].iter().all(|a| a.epoch > old_epoch),
        "the paused leader announced after the takeover: {:?}",
        after.iter().map(|a| (a.metadata.version, a.epoch)).collect::<Vec<_>>()
    );
    let actives = actives.lock().unwrap().clone();
    let moved = actives
        .iter()
        .position(|a| a.epoch > old_epoch)
        .expect("the new leader never set active");
    assert!(
        actives[moved..].iter().all(|a| a.epoch > old_epoch),
        "the paused leader moved active: {actives:?}"
    );
    assert_eq!(lease_holder(&js).await.as_deref(), Some("t2"));
    let versions: Vec<u64> = after.iter().map(|a| a.metadata.version).collect();
    assert_eq!(
        versions.iter().collect::<HashSet<_>>().len(),
        versions.len(),
        "a version number appeared twice: {versions:?}"
    );
    assert!(first.terminate().success());
    assert!(second.terminate().success());
}

/// `wmvae bench failover` on a short lease: frames stream in while the
/// server leading WM_FRAMES is SIGKILLed and restarted, then while the
/// leading trainer is SIGKILLed; every acked frame has exactly one latent.
/// (Its timings are figures for BENCHMARKS.md, not asserted here.)
#[test]
fn failover_loses_and_duplicates_nothing() {
    let out = wmvae()
        .args([
            "bench",
            "failover",
            "--json",
            "--lease-ttl-secs",
            "3",
            "--rate",
            "50",
            "--nats-server",
        ])
        .arg(repo_root().join(".venv/bin/nats-server"))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    let figures: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(figures["acked_frames"].as_u64().unwrap() > 0, "{figures}");
    assert_eq!(figures["acked_frames_lost"], 0, "{figures}");
    assert_eq!(figures["duplicate_latents"], 0, "{figures}");
    assert_eq!(figures["standby_exited_cleanly"], true, "{figures}");
    for key in [
        "stream_failover_s",
        "trainer_failover_s",
        "trainer_failover_checkpoint_s",
    ] {
        assert!(figures[key].as_f64().is_some_and(|s| s > 0.0), "{key}: {figures}");
    }
}

/// `wmvae migrate` on a cluster made with one replica and the default
/// lease, again with three replicas and a shorter lease: streams and
/// buckets get three replicas in place, keeping what they hold, and the
/// lease keeps the TTL it was made with; `wmvae cluster set lease-ttl`
/// changes that (and refuses a TTL under 3 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_and_lease_ttl_change_in_place() {
    let cluster = LocalCluster::start(&repo_root().join(".venv/bin/nats-server"), 3).unwrap();
    let js = jetstream::new(async_nats::connect(cluster.servers[0].url.as_str()).await.unwrap());
    wait_until(Duration::from_secs(60), "the cluster's JetStream", || async {
        js.query_account().await.is_ok()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let migrate = |env: &[(&str, &str)]| {
        let out = wmvae()
            .args(["migrate", "--nats-url", &cluster.url(), "--data-dir"])
            .arg(dir.path())
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    migrate(&[]);
    publish(&js, 1, 10).await;
    migrate(&[("WMVAE_NATS__REPLICAS", "3"), ("WMVAE_NODE__LEASE_TTL_SECS", "3")]);
    for name in [
        "WM_FRAMES",
        "WM_DLQ",
        "WM_LATENTS",
        "WM_CHECKPOINTS",
        "OBJ_wm-checkpoints",
        "KV_wm-lease",
        "KV_wm-meta",
    ] {
        let info = js.get_stream(name).await.unwrap().info().await.unwrap().clone();
        assert_eq!(info.config.num_replicas, 3, "{name}");
    }
    let mut frames = js.get_stream("WM_FRAMES").await.unwrap();
    assert_eq!(frames.info().await.unwrap().state.messages, 10, "frames kept");
    let lease = lease_bucket(&js).await;
    let default_ttl = wmvae::config::Config::load_with_env(None, [])
        .unwrap()
        .node
        .lease_ttl_secs;
    assert_eq!(
        lease.config.max_age,
        Duration::from_secs(default_ttl),
        "a node's start set the lease TTL"
    );

    let out = wmvae()
        .args(["cluster", "set", "lease-ttl", "5", "--nats-url", &cluster.url()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("lease TTL: 5s"));
    let lease = lease_bucket(&js).await;
    assert_eq!(lease.config.max_age, Duration::from_secs(5));
    assert_eq!(lease.config.num_replicas, 3, "kept");
    let out = wmvae()
        .args(["cluster", "set", "lease-ttl", "2", "--nats-url", &cluster.url()])
        .output()
        .unwrap();
    assert!(!out.status.success(), "a TTL under 3 s taken");
}

/// Issue #26: the lease's TTL is the cluster's. Node a leads with a 30 s
/// TTL; node b starts beside it configured with 3 s: the bucket keeps 30 s
/// and b follows it (before, b's start rewrote the bucket's max age, a's
/// lease lapsed between its renewals and b took it within seconds). An
/// operator's `wmvae cluster set lease-ttl 4` is refused (the held key, up
/// to 10 s old, would lapse at once); 12 is followed by the leader within
/// a second, which leads on, renewing at its new pace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_lease_ttl_for_the_cluster_set_by_the_operator() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let js = jetstream::new(nats.client().await);
    let node = |id: &'static str, ttl: &'static str| -> Vec<(&'static str, &'static str)> {
        single_server_env(id)
            .into_iter()
            .chain([("WMVAE_NODE__LEASE_TTL_SECS", ttl)])
            .collect()
    };
    let a = Daemon::start(&nats.url, &dir.path().join("a"), &node("a", "30"));
    wait_until(Duration::from_secs(60), "a to lead", || async {
        lease_holder(&js).await.as_deref() == Some("a")
    })
    .await;
    let b = Daemon::start(&nats.url, &dir.path().join("b"), &node("b", "3"));
    wait_for_consumer(&js, "wmvae-ingest-b").await;
    let max_age = || async { lease_bucket(&js).await.config.max_age };
    let (js_ref, a_ref, b_ref) = (&js, &a, &b);
    let hold = move |seconds: u64| async move {
        for _ in 0..seconds * 2 {
            let holder = lease_holder(js_ref).await;
            assert_eq!(
                holder.as_deref(),
                Some("a"),
                "a lost the lease: a: {} b: {}",
                a_ref.logs(),
                b_ref.logs()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };
    hold(8).await;
    assert_eq!(
        max_age().await,
        Duration::from_secs(30),
        "b's start changed the cluster's TTL"
    );
    assert!(b.logs().contains("is not the cluster's lease TTL"), "{}", b.logs());
    assert!(!b.logs().contains("leading training"), "{}", b.logs());

    let out = wmvae()
        .args(["cluster", "set", "lease-ttl", "4", "--nats-url", &nats.url])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && said.contains("shorten it in steps"), "{said}");
    let out = wmvae()
        .args(["cluster", "set", "lease-ttl", "12", "--nats-url", &nats.url])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The leader within a second; a standby reads it before it next tries to take the lease.
    wait_until(Duration::from_secs(10), "the leader to follow the new TTL", || async {
        a.logs().contains("the cluster's lease TTL is 12s now")
    })
    .await;
    hold(8).await;
    assert!(a.terminate().success());
    assert!(b.terminate().success());
}

/// Next to a single-node default, a trainer with its own id is a standby
/// and deletes nothing; one without an id is refused with a clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_trainer_waits_or_is_refused() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let js = jetstream::new(nats.client().await);
    let single = single_server_env("");
    let leader = Daemon::start(&nats.url, &dir.path().join("single"), &single);
    wait_for_consumer(&js, "wmvae-ingest").await;
    publish(&js, 4, 25).await;
    wait_until(Duration::from_secs(120), "version 3", || async {
        created(&js).await.len() >= 3
    })
    .await;
    let holder = lease_holder(&js).await.unwrap();

    let with_id = single_server_env("b");
    let standby = Daemon::start(&nats.url, &dir.path().join("b"), &with_id);
    wait_for_consumer(&js, "wmvae-ingest-b").await;
    tokio::time::sleep(Duration::from_secs(4)).await; // past a lease TTL
    assert_eq!(lease_holder(&js).await.unwrap(), holder, "the standby took the lease");
    assert!(!standby.logs().contains("leading training"), "{}", standby.logs());
    let bucket = js.get_object_store("wm-checkpoints").await.unwrap();
    for a in created(&js).await {
        assert!(bucket.get(&a.object).await.is_ok(), "{} was deleted", a.object);
    }

    let out = wmvae()
        .args(["serve", "--role", "trainer", "--nats-url", &nats.url, "--data-dir"])
        .arg(dir.path().join("twin"))
        .env("WMVAE_HTTP__ADDR", "")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("another trainer node without a [node] id"), "{said}");
    assert!(standby.terminate().success());
    assert!(leader.terminate().success());
}

/// Issue #26: two trainer processes with one `[node] id`, started at the
/// same moment, are told apart by the server (a KV create of the id's key),
/// not by a discovery ping (which both passed before): one runs, the other
/// exits non-zero saying why once it has waited out a lease TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twins_started_together_one_is_refused_by_the_server() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let env = single_server_env("x");
    // The bucket first, so neither start's migration is what sets them apart.
    let out = wmvae()
        .args(["migrate", "--nats-url", &nats.url, "--data-dir"])
        .arg(dir.path().join("m"))
        .env("WMVAE_NODE__LEASE_TTL_SECS", "3")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut twins = [
        Daemon::start(&nats.url, &dir.path().join("x1"), &env),
        Daemon::start(&nats.url, &dir.path().join("x2"), &env),
    ];
    let mut ended = None;
    for _ in 0..120 {
        if let Some((i, status)) = twins
            .iter_mut()
            .enumerate()
            .find_map(|(i, d)| Some((i, d.try_status()?)))
        {
            ended = Some((i, status));
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (i, status) = ended.unwrap_or_else(|| panic!("both twins run: {}\n---\n{}", twins[0].logs(), twins[1].logs()));
    let refused = twins[i].logs();
    assert!(!status.success(), "{refused}");
    assert!(
        refused.contains("another trainer node with [node] id \"x\" already runs on this NATS"),
        "{refused}"
    );
    let [a, b] = twins;
    let mut running = if i == 0 { b } else { a };
    assert!(running.try_status().is_none(), "{}", running.logs());
    assert!(running.terminate().success());
}

/// Issue #26, found by the nemesis's partition: a renewal of a node's
/// claim on its id that the server applied after the node stopped waiting
/// for its reply (a partitioned server's queued traffic arrives when it
/// heals) moved the claim's revision; the node's next renewal was refused,
/// it found the key held by its own value and stopped as if a twin had
/// taken its id ("... lapsed and <itself> claimed it"), and so did the
/// other trainer. Here the test makes that late write itself (the same
/// value, one revision on): the node takes its own claim back and runs on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_renewed_late_is_not_taken_for_a_twin() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let js = jetstream::new(nats.client().await);
    let mut node = Daemon::start(&nats.url, &dir.path().join("x"), &single_server_env("x"));
    wait_for_consumer(&js, "wmvae-ingest-x").await;
    let lease = js.get_key_value("wm-lease").await.unwrap();
    let claim = lease.entry("node.x").await.unwrap().expect("the node's claim");
    let mut renewals = lease.watch("node.x").await.unwrap();
    let late = lease
        .update("node.x", claim.value.clone(), claim.revision)
        .await
        .unwrap();
    // Renewals come every third of the 3 s TTL: three of them, past the
    // one the late write refused, each the node's own value.
    let renewed = async {
        let mut seen = 0;
        while let Some(entry) = renewals.next().await {
            let entry = entry.unwrap();
            if entry.revision > late && entry.value == claim.value {
                seen += 1;
                if seen == 3 {
                    return;
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), renewed)
        .await
        .unwrap_or_else(|_| panic!("the claim was not renewed after the late write:\n{}", node.logs()));
    assert!(node.try_status().is_none(), "the node stopped:\n{}", node.logs());
    assert!(!node.logs().contains("claimed it"), "{}", node.logs());
    assert!(node.terminate().success());
}

/// Issue #26: a new leader fences first. Leader t1 is paused (SIGSTOP)
/// after `active` was set under its epoch; t2 takes the lease and, held
/// just after its fence by the `takeover-fenced` failpoint (before its
/// catch-up and uploads), `active` already carries t2's epoch: a
/// compare-and-set from the revision t1 last read (what t1 would send on
/// waking) is refused by the server, and so is an announcement under t1's
/// fence of the announcements. Before, the fence came at the end of the
/// takeover, and that write went through in this window; announcements
/// were not conditioned at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_fences_before_anything_else() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let js = jetstream::new(nats.client().await);
    let first = Daemon::start(&nats.url, &dir.path().join("t1"), &single_server_env("t1"));
    wait_for_consumer(&js, "wmvae-ingest-t1").await;
    publish(&js, 6, 25).await; // enough for training frames past [train] min_frames
    wait_until(Duration::from_secs(120), "version 2 active", || async {
        created(&js).await.len() >= 2
    })
    .await;
    let meta = js.get_key_value("wm-meta").await.unwrap();
    // What t1 last read of `active`, and would compare-and-set from on waking.
    let read = meta.entry("active").await.unwrap().unwrap();
    let old: Active = serde_json::from_slice(&read.value).unwrap();

    first.signal("STOP");
    let held: Vec<(&str, &str)> = single_server_env("t2")
        .into_iter()
        .chain([("FAILPOINTS", "takeover-fenced=sleep(6000)")])
        .collect();
    let second = Daemon::start(&nats.url, &dir.path().join("t2"), &held);
    second
        .wait_for_log(
            "fenced: the active version is held under this epoch",
            Duration::from_secs(60),
        )
        .await;
    let now: Active = serde_json::from_slice(&meta.entry("active").await.unwrap().unwrap().value).unwrap();
    assert!(now.epoch > old.epoch, "active not fenced: {now:?} after {old:?}");
    assert_eq!(now.version, old.version, "the fence moves no version");
    let zombie = Active {
        version: old.version + 100,
        ..old.clone()
    };
    let refused = meta
        .update("active", serde_json::to_vec(&zombie).unwrap().into(), read.revision)
        .await;
    assert!(refused.is_err(), "the former leader's compare-and-set went through");
    // And its announcements: one under t1's fence (what t1 would publish on waking) is refused by the server.
    second
        .wait_for_log(
            "fenced: announcements go out under this epoch's fence",
            Duration::from_secs(30),
        )
        .await;
    let fences: Vec<(u64, Fence)> = stream_messages(&js, "WM_CHECKPOINTS")
        .await
        .iter()
        .filter(|m| m.subject.as_str() == "wm.checkpoints.fence")
        .map(|m| (m.sequence, rmp_serde::from_slice(&m.payload).unwrap()))
        .collect();
    let t1_fence = fences.iter().find(|(_, f)| f.epoch == old.epoch).expect("t1's fence").0;
    assert!(
        fences.iter().any(|(_, f)| f.epoch == now.epoch),
        "t2's fence: {fences:?}"
    );
    let zombie = announcements(&js).await.pop().unwrap();
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Expected-Last-Subject-Sequence", t1_fence.to_string().as_str());
    headers.insert("Nats-Expected-Last-Subject-Sequence-Subject", "wm.checkpoints.fence");
    let published = js
        .publish_with_headers("wm.checkpoints", headers, zombie.to_msgpack().into())
        .await
        .unwrap()
        .await;
    assert!(
        published.is_err(),
        "an announcement under the former leader's fence went through"
    );

    first.signal("CONT");
    second.wait_for_log("leading training", Duration::from_secs(60)).await;
    let last: Active = serde_json::from_slice(&meta.entry("active").await.unwrap().unwrap().value).unwrap();
    assert_eq!(last.epoch, now.epoch, "{last:?}");
    assert!(first.terminate().success());
    assert!(second.terminate().success());
}
