//! NATS authentication and TLS: the CLI, the daemon and the Python examples
//! against nats-servers that demand user/password, a token, an nkey, a
//! creds file (operator mode) or a client certificate; wrong credentials
//! refused cleanly with no secret printed; and the shipped roles
//! (config/nats-permissions.conf) keeping rollback to operators.

mod common;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use common::nats::{wait_for_ingest_consumer, wait_until, Daemon};
use common::{frames, repo_root, venv_python, wmvae};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use wmvae::bus::messages::{Announcement, CheckpointEvent};
use wmvae::bus::service::Endpoint;
use wmvae::frames::wire::FrameMessage;
use wmvae_bench::nats_server::LocalNats;

/// A server demanding one way of authenticating, and the client settings
/// (WMVAE_NATS__*) that pass and that fail.
struct Scheme {
    name: &'static str,
    server_config: String,
    right: Vec<(String, String)>,
    wrong: Vec<(String, String)>,
    /// What must never be printed (password, token, seed).
    secret: Option<String>,
    /// What a refusal says.
    refusal: &'static str,
    /// Certificates or creds the settings point at, kept while the test runs.
    _files: Option<tempfile::TempDir>,
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(k, v)| (format!("WMVAE_NATS__{}", k.to_uppercase()), v.to_string()))
        .collect()
}

fn start(server_config: &str) -> LocalNats {
    LocalNats::start_with(&repo_root().join(".venv/bin/nats-server"), server_config).unwrap()
}

fn run(mut cmd: Command, env: &[(String, String)]) -> (Output, Duration) {
    let started = Instant::now();
    let out = cmd.envs(env.iter().map(|(k, v)| (k, v))).output().unwrap();
    (out, started.elapsed())
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn migrate(url: &str, data_dir: &Path) -> Command {
    let mut cmd = wmvae();
    cmd.args(["migrate", "--nats-url", url, "--data-dir"]).arg(data_dir);
    cmd
}

fn python_check(url: &str) -> Command {
    let mut cmd = Command::new(venv_python());
    cmd.arg(repo_root().join("examples/wm_nats.py")).arg(url);
    cmd
}

/// Runs every client with the right and the wrong settings against `scheme`.
fn check_scheme(scheme: Scheme) {
    let server = start(&scheme.server_config);
    let dir = tempfile::tempdir().unwrap();
    let name = scheme.name;
    let hides_secret = |out: &str| {
        if let Some(secret) = &scheme.secret {
            assert!(!out.contains(secret.as_str()), "{name}: secret printed:\n{out}");
        }
    };

    let (out, _) = run(migrate(&server.url, &dir.path().join("store")), &scheme.right);
    assert!(
        out.status.success(),
        "{name}: wmvae migrate with the right settings: {}",
        text(&out)
    );
    hides_secret(&text(&out));

    let (out, _) = run(python_check(&server.url), &scheme.right);
    assert!(
        out.status.success(),
        "{name}: examples/wm_nats.py with the right settings: {}",
        text(&out)
    );
    assert!(text(&out).contains("connected to"), "{}", text(&out));

    let mut check = wmvae();
    check.args(["serve", "--check-config"]);
    let (out, _) = run(check, &scheme.right);
    assert!(out.status.success(), "{name}: --check-config: {}", text(&out));
    hides_secret(&text(&out));

    let (out, took) = run(migrate(&server.url, &dir.path().join("store")), &scheme.wrong);
    assert!(!out.status.success(), "{name}: wrong settings were accepted");
    assert!(
        text(&out).contains(scheme.refusal),
        "{name}: refusal should say {:?}:\n{}",
        scheme.refusal,
        text(&out)
    );
    assert!(took < Duration::from_secs(15), "{name}: refusal took {took:?}");
    hides_secret(&text(&out));

    let (out, _) = run(python_check(&server.url), &scheme.wrong);
    assert!(
        !out.status.success(),
        "{name}: examples/wm_nats.py accepted wrong settings"
    );
    hides_secret(&text(&out));
}

/// What every credential refusal says.
const REFUSED: &str = "refused the credentials";

/// User and password: right ones connect everything, a wrong password is refused.
#[test]
fn user_and_password() {
    check_scheme(Scheme {
        name: "user/password",
        server_config: r#"authorization { user: alice, password: "pw-7f3a1c" }"#.into(),
        right: pairs(&[("user", "alice"), ("password", "pw-7f3a1c")]),
        wrong: pairs(&[("user", "alice"), ("password", "pw-wrong")]),
        secret: Some("pw-7f3a1c".into()),
        refusal: REFUSED,
        _files: None,
    });
}

/// Token: the right token connects, another is refused.
#[test]
fn token() {
    check_scheme(Scheme {
        name: "token",
        server_config: r#"authorization { token: "tok-91d2e8" }"#.into(),
        right: pairs(&[("token", "tok-91d2e8")]),
        wrong: pairs(&[("token", "tok-wrong")]),
        secret: Some("tok-91d2e8".into()),
        refusal: REFUSED,
        _files: None,
    });
}

/// Nkey: the server lists a public key; its seed connects, another seed is refused.
#[test]
fn nkey_seed() {
    let user = nkeys::KeyPair::new_user();
    let seed = user.seed().unwrap();
    let stranger = nkeys::KeyPair::new_user().seed().unwrap();
    check_scheme(Scheme {
        name: "nkey",
        server_config: format!("authorization {{ users = [ {{ nkey: {} }} ] }}", user.public_key()),
        right: pairs(&[("nkey_seed", &seed)]),
        wrong: pairs(&[("nkey_seed", &stranger)]),
        secret: Some(seed),
        refusal: REFUSED,
        _files: None,
    });
}

/// A JWT as nsc writes them: header, claims, ed25519 signature by `issuer`.
fn jwt(issuer: &nkeys::KeyPair, subject: &str, name: &str, nats: serde_json::Value) -> String {
    let header = URL_SAFE_NO_PAD.encode(r#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let iat = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = serde_json::json!({
        "jti": format!("{name}{iat}").to_uppercase(), "iat": iat, "iss": issuer.public_key(),
        "name": name, "sub": subject, "nats": nats,
    });
    let body = URL_SAFE_NO_PAD.encode(claims.to_string());
    let signature = issuer.sign(format!("{header}.{body}").as_bytes()).unwrap();
    format!("{header}.{body}.{}", URL_SAFE_NO_PAD.encode(signature))
}

/// A `.creds` file for a user of `account`.
fn creds_file(path: &Path, account: &nkeys::KeyPair) {
    let user = nkeys::KeyPair::new_user();
    let token = jwt(
        account,
        &user.public_key(),
        "rollout",
        serde_json::json!({
            "type": "user", "version": 2, "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1,
        }),
    );
    let seed = user.seed().unwrap();
    std::fs::write(
        path,
        format!(
            "-----BEGIN NATS USER JWT-----\n{token}\n------END NATS USER JWT------\n\n\
         -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
        ),
    )
    .unwrap();
}

/// Creds file: an operator-mode server with JetStream; a user of its
/// account connects, a user of an account it does not know is refused.
#[test]
fn creds_file_in_operator_mode() {
    let files = tempfile::tempdir().unwrap();
    let operator = nkeys::KeyPair::new_operator();
    let account = nkeys::KeyPair::new_account();
    let operator_jwt = jwt(
        &operator,
        &operator.public_key(),
        "op",
        serde_json::json!({"type": "operator", "version": 2}),
    );
    let account_jwt = jwt(
        &operator,
        &account.public_key(),
        "wm",
        serde_json::json!({
            "type": "account", "version": 2,
            "limits": {
                "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": true,
                "conn": -1, "leaf": -1, "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1,
            },
        }),
    );
    // JetStream in operator mode needs a system account.
    let system = nkeys::KeyPair::new_account();
    let system_jwt = jwt(
        &operator,
        &system.public_key(),
        "SYS",
        serde_json::json!({"type": "account", "version": 2}),
    );
    let (right, wrong) = (files.path().join("right.creds"), files.path().join("wrong.creds"));
    creds_file(&right, &account);
    creds_file(&wrong, &nkeys::KeyPair::new_account());
    check_scheme(Scheme {
        name: "creds file",
        server_config: format!(
            "operator: {operator_jwt}\nsystem_account: {sys}\nresolver: MEMORY\n\
             resolver_preload: {{ {sys}: {system_jwt}, {acc}: {account_jwt} }}",
            sys = system.public_key(),
            acc = account.public_key()
        ),
        right: pairs(&[("creds_file", right.to_str().unwrap())]),
        wrong: pairs(&[("creds_file", wrong.to_str().unwrap())]),
        secret: None,
        refusal: REFUSED,
        _files: Some(files),
    });
}

/// PEM files of a certificate signed by `ca`, for `names`, with `usage`.
fn issue(
    ca: &rcgen::Certificate,
    ca_key: &rcgen::KeyPair,
    names: &[&str],
    usage: rcgen::ExtendedKeyUsagePurpose,
    dir: &Path,
    stem: &str,
) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name.push(rcgen::DnType::CommonName, names[0]);
    params.extended_key_usages = vec![usage];
    let cert = params.signed_by(&key, ca, ca_key).unwrap();
    std::fs::write(dir.join(format!("{stem}.pem")), cert.pem()).unwrap();
    std::fs::write(dir.join(format!("{stem}-key.pem")), key.serialize_pem()).unwrap();
}

fn certificate_authority(dir: &Path, stem: &str) -> (rcgen::Certificate, rcgen::KeyPair) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(rcgen::DnType::CommonName, stem);
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key).unwrap();
    std::fs::write(dir.join(format!("{stem}.pem")), cert.pem()).unwrap();
    (cert, key)
}

/// TLS with client certificates: a certificate from the server's CA
/// connects, one from another CA is refused.
#[test]
fn tls_client_certificate() {
    use rcgen::ExtendedKeyUsagePurpose::{ClientAuth, ServerAuth};
    let files = tempfile::tempdir().unwrap();
    let dir = files.path();
    let (ca, ca_key) = certificate_authority(dir, "ca");
    issue(&ca, &ca_key, &["127.0.0.1", "localhost"], ServerAuth, dir, "server");
    issue(&ca, &ca_key, &["rollout"], ClientAuth, dir, "client");
    let (other_ca, other_key) = certificate_authority(dir, "other-ca");
    issue(&other_ca, &other_key, &["intruder"], ClientAuth, dir, "intruder");
    let path = |name: &str| dir.join(name).to_str().unwrap().to_string();
    check_scheme(Scheme {
        name: "tls",
        server_config: format!(
            "tls {{ cert_file: {:?}, key_file: {:?}, ca_file: {:?}, verify: true, timeout: 5 }}",
            path("server.pem"),
            path("server-key.pem"),
            path("ca.pem")
        ),
        right: pairs(&[
            ("tls_ca_file", &path("ca.pem")),
            ("tls_cert_file", &path("client.pem")),
            ("tls_key_file", &path("client-key.pem")),
        ]),
        wrong: pairs(&[
            ("tls_ca_file", &path("ca.pem")),
            ("tls_cert_file", &path("intruder.pem")),
            ("tls_key_file", &path("intruder-key.pem")),
        ]),
        secret: None,
        refusal: "TLS",
        _files: Some(files),
    });
}

/// The daemon with a wrong password exits at once with a clear error; it
/// does not retry for ever.
#[test]
fn daemon_refused_exits() {
    let server = start(r#"authorization { user: alice, password: "pw-7f3a1c" }"#);
    let dir = tempfile::tempdir().unwrap();
    let mut serve = wmvae();
    serve
        .args(["serve", "--nats-url", &server.url, "--data-dir"])
        .arg(dir.path().join("store"))
        .env("WMVAE_HTTP__ADDR", "");
    let (out, took) = run(serve, &pairs(&[("user", "alice"), ("password", "pw-wrong-1")]));
    assert!(!out.status.success());
    assert!(text(&out).contains(REFUSED), "{}", text(&out));
    assert!(!text(&out).contains("pw-wrong-1"), "{}", text(&out));
    assert!(took < Duration::from_secs(30), "took {took:?}");
}

/// The versions rolled back to, from the WM_CHECKPOINTS announcements.
async fn rollbacks(js: &async_nats::jetstream::Context) -> Vec<u64> {
    let mut stream = js.get_stream("WM_CHECKPOINTS").await.unwrap();
    let last = stream.info().await.unwrap().state.last_sequence;
    let mut to = Vec::new();
    for seq in 1..=last {
        let message = stream.get_raw_message(seq).await.unwrap();
        if message.subject.as_str() != "wm.checkpoints" {
            continue; // a leader's fence
        }
        let announcement: Announcement = rmp_serde::from_slice(&message.payload).unwrap();
        if announcement.event == CheckpointEvent::Rollback {
            to.extend(announcement.to);
        }
    }
    to
}

/// A client of `user` on the roles' server, on its own inbox prefix, that
/// gives up on a request after a second, and the server's complaints.
async fn role_client(url: &str, user: &str, password: &str) -> (async_nats::Client, Arc<Mutex<Vec<String>>>) {
    let complaints = Arc::new(Mutex::new(Vec::new()));
    let heard = complaints.clone();
    let client = async_nats::ConnectOptions::with_user_and_password(user.into(), password.into())
        .custom_inbox_prefix(format!("_INBOX_{user}"))
        .request_timeout(Some(Duration::from_secs(1)))
        .event_callback(move |event| {
            let heard = heard.clone();
            async move {
                if let async_nats::Event::ServerError(e) = event {
                    heard.lock().unwrap().push(e.to_string());
                }
            }
        })
        .connect(url)
        .await
        .unwrap();
    (client, complaints)
}

/// How long an allowed request may take to be answered: past a
/// checkpoint's writing on a loaded box (the changes wait for the trainer's
/// next step).
const ANSWER_PATIENCE: Duration = Duration::from_secs(15);

/// A request each endpoint answers without changing anything (an unknown
/// version, an object that is not there, a frame that does not decode).
fn harmless(endpoint: Endpoint) -> &'static [u8] {
    match endpoint {
        Endpoint::Import => br#"{"object": "imports/not-there"}"#,
        Endpoint::Encode => b"\xc1",
        _ => br#"{"version": 999999}"#,
    }
}

/// config/nats-permissions.conf, the whole role x endpoint matrix: each
/// user's request to each control endpoint is answered or refused by the
/// server as the roles say (the publisher none, the reader all but the five
/// that change the daemon, the operator all); none may read another user's
/// inbox; a publisher's frames are stored; a reader loads the active weights
/// into PyTorch; only an operator rolls back and imports (live, uploading
/// through the object store), and the history names the user the server
/// authenticated, whatever the request's `by` says; discovery reaches the
/// control service in its own account.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_keep_rollback_to_operators() {
    let passwords = "WM_DAEMON_PASSWORD: d-pw\nWM_PUBLISHER_PASSWORD: p-pw\nWM_READER_PASSWORD: \
        r-pw\nWM_OPERATOR_PASSWORD: o-pw\nWM_CONTROL_PASSWORD: c-pw\n";
    let roles = std::fs::read_to_string(repo_root().join("config/nats-permissions.conf")).unwrap();
    let server = start(&format!("{passwords}{roles}"));
    let as_user = |user: &str, password: &str| {
        pairs(&[
            ("user", user),
            ("password", password),
            ("inbox_prefix", &format!("_INBOX_{user}")),
        ])
    };
    let daemon_env = pairs(&[
        ("user", "wmvae"),
        ("password", "d-pw"),
        ("control_user", "wmvae-control"),
        ("control_password", "c-pw"),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let mut env: Vec<(&str, &str)> = daemon_env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    env.extend([
        ("WMVAE_TRAIN__MIN_FRAMES", "40"),
        ("WMVAE_TRAIN__BATCH_SIZE", "8"),
        ("WMVAE_TRAIN__CHECKPOINT_EVERY_STEPS", "5"),
        ("WMVAE_TRAIN__EVAL_EVERY_STEPS", "5"),
        ("WMVAE_TRAIN__SAMPLES_PER_INSERT", "0"),
        ("WMVAE_TRAIN__THREADS", "1"),
        ("WMVAE_TRAIN__KEEP_LAST", "1000"),
        ("WMVAE_BUFFER__VALIDATION_FRACTION", "0.3"),
    ]);
    let daemon = Daemon::start(&server.url, dir.path(), &env);
    let admin = async_nats::ConnectOptions::with_user_and_password("wmvae".into(), "d-pw".into())
        .connect(&server.url)
        .await
        .unwrap();
    let js = async_nats::jetstream::new(admin.clone());
    wait_for_ingest_consumer(&js).await;

    // The publisher's frames are stored.
    let (publisher, _) = role_client(&server.url, "publisher", "p-pw").await;
    let publisher_js = async_nats::jetstream::new(publisher.clone());
    for (i, px) in frames(80, 64, 64).chunks(12288).enumerate() {
        let msg = FrameMessage::rgb(format!("e{}", i / 8), i as u64 % 8, 64, 64, px.to_vec());
        publisher_js
            .publish("wm.frames.car", msg.to_msgpack().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let status = || async {
        match admin.request("wm.ctl.status", "".into()).await {
            Ok(reply) => serde_json::from_slice::<serde_json::Value>(&reply.payload).unwrap(),
            Err(_) => serde_json::Value::Null, // the service is not up yet
        }
    };
    wait_until(Duration::from_secs(120), "version 2", || async {
        status().await["active_version"].as_u64() >= Some(2)
    })
    .await;
    assert_eq!(status().await["buffer_frames"].as_u64(), Some(80));

    // Every role against every endpoint: answered, or refused by the server.
    let (reader, reader_complaints) = role_client(&server.url, "reader", "r-pw").await;
    let (operator, _) = role_client(&server.url, "operator", "o-pw").await;
    let changes = [
        Endpoint::Rollback,
        Endpoint::Pin,
        Endpoint::Unpin,
        Endpoint::Delete,
        Endpoint::Import,
    ];
    for endpoint in Endpoint::ALL {
        let subject = format!("wm.ctl.{}", endpoint.name());
        for (user, client, allowed) in [
            ("publisher", &publisher, false),
            ("reader", &reader, !changes.contains(&endpoint)),
            ("operator", &operator, true),
        ] {
            // A change waits for the trainer's next step (a checkpoint being
            // written takes seconds on a loaded box): an answer may take that
            // long; a refused request has no answer, so a second shows it.
            let patience = if allowed {
                ANSWER_PATIENCE
            } else {
                Duration::from_secs(1)
            };
            let request = async_nats::Request::new()
                .payload(harmless(endpoint).into())
                .timeout(Some(patience));
            let answered = client.send_request(subject.clone(), request).await.is_ok();
            assert_eq!(
                answered, allowed,
                "{user} on {subject}: answered {answered}, the roles say {allowed}"
            );
        }
    }
    let versions_after_matrix = status().await["active_version"].as_u64();

    // No one reads another's inbox: the server refuses the subscription,
    // and the operator's replies do not reach the reader.
    let mut snooped = reader.subscribe("_INBOX_operator.>").await.unwrap();
    operator.request("wm.ctl.status", "".into()).await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_secs(1), futures::StreamExt::next(&mut snooped))
            .await
            .is_err(),
        "the reader read the operator's reply"
    );
    wait_until(
        Duration::from_secs(5),
        "the server to refuse the reader's subscription",
        || async {
            reader_complaints
                .lock()
                .unwrap()
                .iter()
                .any(|c| c.to_lowercase().contains("permissions violation for subscription"))
        },
    )
    .await;

    let checkpoint = |args: &[&str], who: Vec<(String, String)>| {
        let mut cmd = wmvae();
        cmd.args(["checkpoint", "--online", "--nats-url", &server.url])
            .args(args);
        run(cmd, &who).0
    };
    // Neither the publisher nor the reader may roll back; the server says why.
    for (user, password) in [("publisher", "p-pw"), ("reader", "r-pw")] {
        let out = checkpoint(&["rollback", "1", "--reason", "test"], as_user(user, password));
        assert!(!out.status.success(), "{user} rolled back: {}", text(&out));
        assert!(
            text(&out).to_lowercase().contains("permissions violation"),
            "{user}: {}",
            text(&out)
        );
    }
    assert_eq!(rollbacks(&js).await, Vec::<u64>::new());

    // The reader fetches the active weights into PyTorch.
    let png = dir.path().join("recon.png");
    let mut load = Command::new(venv_python());
    load.arg(repo_root().join("examples/load_in_pytorch.py"))
        .arg(&server.url)
        .arg(&png);
    let (out, _) = run(load, &as_user("reader", "r-pw"));
    assert!(out.status.success(), "reader could not load weights: {}", text(&out));
    assert!(png.exists());

    // The operator may roll back, and import live (the reader may not).
    let out = checkpoint(&["rollback", "1", "--reason", "test"], as_user("operator", "o-pw"));
    assert!(out.status.success(), "operator: {}", text(&out));
    // Announced once the versions queued before it are in the object store.
    wait_until(Duration::from_secs(60), "the rollback announced", || async {
        !rollbacks(&js).await.is_empty()
    })
    .await;
    assert_eq!(rollbacks(&js).await, vec![1]);
    // Recorded as by the user the server authenticated, not the one the request names.
    // (The trainer takes it between two steps: more than the role clients' second.)
    let rollback = async_nats::Request::new()
        .payload(br#"{"version": 2, "by": "mallory"}"#.as_ref().into())
        .timeout(Some(Duration::from_secs(30)));
    operator
        .send_request("wm.ctl.checkpoints.rollback", rollback)
        .await
        .unwrap();
    let history = reader.request("wm.ctl.checkpoints.history", "".into()).await.unwrap();
    let history: Vec<serde_json::Value> = serde_json::from_slice(&history.payload).unwrap();
    let by: Vec<&str> = history
        .iter()
        .filter(|h| h["why"] == "rollback")
        .map(|h| h["by"].as_str().unwrap())
        .collect();
    assert_eq!(by, ["operator", "operator"], "{history:?}");
    // Discovery crosses into the control service's account.
    let inbox = reader.new_inbox();
    let mut pongs = reader.subscribe(inbox.clone()).await.unwrap();
    reader
        .publish_with_reply("$SRV.PING.wmvae", inbox, "".into())
        .await
        .unwrap();
    assert!(
        tokio::time::timeout(Duration::from_secs(2), futures::StreamExt::next(&mut pongs))
            .await
            .is_ok_and(|p| p.is_some()),
        "no pong from the control service"
    );
    let weights = dir.path().join("v2.safetensors");
    let out = checkpoint(
        &["export", "2", "--out", weights.to_str().unwrap()],
        as_user("reader", "r-pw"),
    );
    assert!(out.status.success(), "reader export: {}", text(&out));
    let out = checkpoint(
        &["import", weights.to_str().unwrap(), "--reason", "roles test"],
        as_user("reader", "r-pw"),
    );
    assert!(!out.status.success(), "the reader imported: {}", text(&out));
    let out = checkpoint(
        &["import", weights.to_str().unwrap(), "--reason", "roles test"],
        as_user("operator", "o-pw"),
    );
    assert!(out.status.success(), "operator import: {}", text(&out));
    assert!(
        status().await["active_version"].as_u64() > versions_after_matrix,
        "the import did not become active"
    );
    assert!(daemon.terminate().success());
}
