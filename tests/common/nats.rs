//! A real nats-server (the venv's, with JetStream and `sync_interval:
//! always`) on a free loopback port with a temporary store, and a real
//! `wmvae serve` daemon against it. Both are killed when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The venv's nats-server on a free port, via the library's own harness.
pub struct NatsServer {
    server: wmvae_bench::nats_server::LocalNats,
    pub url: String,
}

impl NatsServer {
    pub fn start() -> NatsServer {
        let server =
            wmvae_bench::nats_server::LocalNats::start(&super::repo_root().join(".venv/bin/nats-server")).unwrap();
        NatsServer {
            url: server.url.clone(),
            server,
        }
    }

    /// SIGKILL: the server is gone, as after a crash.
    pub fn kill(&mut self) {
        self.server.kill();
    }

    /// SIGTERM: a clean shutdown; returns once the server has exited.
    pub fn terminate(&mut self) {
        self.server.terminate();
    }

    /// Starts it again, on the same port and store, after [`NatsServer::kill`].
    pub fn restart(&mut self) {
        self.server.restart().unwrap();
    }

    /// SIGKILL, then a start on the same port without the JetStream store.
    pub fn restart_empty(&mut self) {
        self.server.restart_empty().unwrap();
    }

    pub async fn client(&self) -> async_nats::Client {
        async_nats::connect(&self.server.url).await.unwrap()
    }
}

/// A `wmvae serve` child process.
pub struct Daemon {
    child: Option<Child>,
    pub data_dir: PathBuf,
}

impl Daemon {
    /// Starts `wmvae serve` with `env` overrides (WMVAE_...) and logs to
    /// `data_dir/serve-N.log`.
    pub fn start(nats_url: &str, data_dir: &Path, env: &[(&str, &str)]) -> Daemon {
        Self::start_with(nats_url, data_dir, None, env)
    }

    /// [`Daemon::start`] with `--config config` too.
    pub fn start_with(nats_url: &str, data_dir: &Path, config: Option<&Path>, env: &[(&str, &str)]) -> Daemon {
        std::fs::create_dir_all(data_dir).unwrap();
        let n = std::fs::read_dir(data_dir).unwrap().count();
        let log = std::fs::File::create(data_dir.join(format!("serve-{n}.log"))).unwrap();
        let mut cmd = super::wmvae();
        cmd.args(["serve", "--nats-url", nats_url, "--data-dir"])
            .arg(data_dir.join("store"));
        if let Some(config) = config {
            cmd.arg("--config").arg(config);
        }
        cmd.env("WMVAE_TRAIN__DEVICE", "cpu")
            .env("WMVAE_INGEST__ACK_WAIT_SECS", "2")
            // Tests run daemons side by side: no fixed HTTP port unless asked.
            .env("WMVAE_HTTP__ADDR", "")
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Daemon {
            child: Some(cmd.spawn().unwrap()),
            data_dir: data_dir.to_owned(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// SIGTERM, then wait for the exit.
    pub fn terminate(mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        wait_with_timeout(&mut child, Duration::from_secs(60))
    }

    /// Sends `signal` (TERM, STOP, ...) and goes on.
    pub fn signal(&self, signal: &str) {
        assert!(Command::new("kill")
            .args([&format!("-{signal}"), &self.pid().to_string()])
            .status()
            .unwrap()
            .success());
    }

    /// Waits for the exit, at most `timeout` (then it panics); its logs stay readable.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        wait_with_timeout(&mut self.child.take().unwrap(), timeout)
    }

    /// The exit status, if the daemon has exited (None while it runs).
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().and_then(|child| child.try_wait().unwrap())
    }

    /// SIGKILL: no chance to clean up.
    pub fn kill(mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Everything the daemon logged so far.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for entry in std::fs::read_dir(&self.data_dir).unwrap().flatten() {
            if entry.file_name().to_string_lossy().starts_with("serve-") {
                out += &std::fs::read_to_string(entry.path()).unwrap_or_default();
            }
        }
        out
    }
}

fn wait_with_timeout(child: &mut Child, timeout: Duration) -> ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("daemon did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Polls `check` every 100 ms until it returns true or `timeout` passes.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl Daemon {
    /// [`wait_until`], failing with this daemon's logs.
    pub async fn wait_until<F, Fut>(&self, timeout: Duration, what: &str, mut check: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = Instant::now() + timeout;
        while !check().await {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; the daemon's logs:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Until this daemon has logged `line`.
    pub async fn wait_for_log(&self, line: &str, timeout: Duration) {
        self.wait_until(timeout, &format!("the log line {line:?}"), || async {
            self.logs().contains(line)
        })
        .await;
    }

    /// Until this daemon's `/healthz` (HTTP on `port`) answers 503 saying `problem`.
    pub async fn wait_unhealthy(&self, port: u16, problem: &str, timeout: Duration) {
        self.wait_until(timeout, &format!("/healthz to say {problem}"), || async {
            let (code, body) = super::http_get(port, "/healthz");
            code == 503 && body.contains(problem)
        })
        .await;
    }
}

/// Waits until a daemon has applied its migrations: the frame consumer exists.
pub async fn wait_for_ingest_consumer(js: &async_nats::jetstream::Context) {
    wait_for_consumer(js, "wmvae-ingest").await;
}

/// Waits until the durable consumer `name` on WM_FRAMES exists.
pub async fn wait_for_consumer(js: &async_nats::jetstream::Context, name: &str) {
    wait_until(Duration::from_secs(60), "the daemon's migrations", || async {
        match js.get_stream("WM_FRAMES").await {
            Ok(stream) => stream
                .get_consumer::<async_nats::jetstream::consumer::pull::Config>(name)
                .await
                .is_ok(),
            Err(_) => false,
        }
    })
    .await;
}

/// Every message stream `name` holds, oldest first (none before the
/// stream exists).
pub async fn stream_messages(
    js: &async_nats::jetstream::Context,
    name: &str,
) -> Vec<async_nats::jetstream::message::StreamMessage> {
    let Ok(mut stream) = js.get_stream(name).await else {
        return Vec::new();
    };
    let Ok(info) = stream.info().await else {
        return Vec::new();
    };
    let (first, last) = (info.state.first_sequence, info.state.last_sequence);
    let mut out = Vec::new();
    for seq in first..=last {
        if let Ok(message) = stream.get_raw_message(seq).await {
            out.push(message);
        }
    }
    out
}

/// Every announcement WM_CHECKPOINTS holds (`wm.checkpoints`, not the
/// leaders' fences beside them), oldest first, as stored.
pub async fn announcement_messages(
    js: &async_nats::jetstream::Context,
) -> Vec<async_nats::jetstream::message::StreamMessage> {
    let mut messages = stream_messages(js, "WM_CHECKPOINTS").await;
    messages.retain(|m| m.subject.as_str() == "wm.checkpoints");
    messages
}

/// Every announcement WM_CHECKPOINTS holds, oldest first.
pub async fn announcements(js: &async_nats::jetstream::Context) -> Vec<wmvae::bus::messages::Announcement> {
    announcement_messages(js)
        .await
        .iter()
        .map(|m| rmp_serde::from_slice(&m.payload).expect("an announcement decodes"))
        .collect()
}

/// Publishes steps `from..to` of episode `e` (64x64 frames), each with its
/// `Nats-Msg-Id` and awaited until JetStream stored it; retried (as rollout
/// workers do) while the server is away or just back.
pub async fn publish_stored(js: &async_nats::jetstream::Context, from: u64, to: u64) {
    let pixels = super::frames((to - from) as usize, 64, 64);
    for (step, px) in (from..to).zip(pixels.chunks(12288)) {
        let payload = wmvae::frames::wire::FrameMessage::rgb("e", step, 64, 64, px).to_msgpack();
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("test/e/{step}").as_str());
        wait_until(Duration::from_secs(60), "a frame stored by JetStream", || async {
            match js
                .publish_with_headers("wm.frames.car", headers.clone(), payload.clone().into())
                .await
            {
                Ok(ack) => ack.await.is_ok(),
                Err(_) => false,
            }
        })
        .await;
    }
}
