//! Opening the NATS connection: credentials and TLS from `[nats]`, a
//! bounded wait for a server that is still starting, and a clean, early
//! refusal when the server rejects who we are.
//!
//! It reads secrets only to hand them to async-nats; it never logs or
//! formats them (the config's `Secret` type redacts itself anyway).

use crate::config::NatsConfig;
use anyhow::{anyhow, Context, Result};
use async_nats::{ConnectErrorKind, ConnectOptions};
use std::time::Duration;
use tokio::time::Instant;

/// How long the daemon waits for a server that is not up yet: a deployment
/// starts NATS and the daemon together, and a server's start takes seconds;
/// past this a supervisor's restart says more than a process that waits.
pub const STARTUP_PATIENCE: Duration = Duration::from_secs(120);
/// Pause between attempts while waiting.
const RETRY_PAUSE: Duration = Duration::from_secs(1);
/// One attempt gives up after this long (DNS, TCP, TLS and the handshake).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The client options for `config`: name, timeouts, credentials and TLS.
pub async fn options(config: &NatsConfig) -> Result<ConnectOptions> {
    let mut options = ConnectOptions::new()
        .name("wmvae")
        .connection_timeout(CONNECT_TIMEOUT)
        .custom_inbox_prefix(&config.inbox_prefix);
    if let Some(password) = config.password.expose() {
        options = options.user_and_password(config.user.clone(), password.to_string());
    } else if let Some(token) = config.token.expose() {
        options = options.token(token.to_string());
    } else if let Some(seed) = config.nkey_seed.expose() {
        options = options.nkey(seed.to_string());
    } else if !config.creds_file.is_empty() {
        options = options
            .credentials_file(&config.creds_file)
            .await
            .with_context(|| format!("nats.creds_file {}: not a NATS credentials file", config.creds_file))?;
    }
    Ok(with_tls(options, config))
}

/// The options for the control service's own connection, when
/// `control_user` is set: that user, the main connection's TLS.
pub fn control_options(config: &NatsConfig) -> Option<ConnectOptions> {
    let password = config.control_password.expose()?;
    let options = ConnectOptions::with_user_and_password(config.control_user.clone(), password.to_string())
        .name("wmvae-control")
        .connection_timeout(CONNECT_TIMEOUT);
    Some(with_tls(options, config))
}

/// `options` with the CA and client certificate of `config`, if any.
fn with_tls(mut options: ConnectOptions, config: &NatsConfig) -> ConnectOptions {
    if !config.tls_ca_file.is_empty() {
        options = options
            .add_root_certificates(config.tls_ca_file.clone().into())
            .require_tls(true);
    }
    if !config.tls_cert_file.is_empty() {
        options = options
            .add_client_certificate(config.tls_cert_file.clone().into(), config.tls_key_file.clone().into())
            .require_tls(true);
    }
    options
}

/// Connects with `options` (rebuilt for every attempt by `make`): once when
/// `patience` is zero, else retrying while the server is unreachable, for
/// at most `patience`. A refusal (credentials, TLS) ends it at once.
pub async fn connect<F, Fut>(config: &NatsConfig, patience: Duration, mut make: F) -> Result<async_nats::Client>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<ConnectOptions>>,
{
    let deadline = Instant::now() + patience;
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let servers: Vec<&str> = config.url.split(',').map(str::trim).collect();
        let error = match make().await?.connect(servers.as_slice()).await {
            Ok(client) => return Ok(client),
            Err(error) => error,
        };
        if let Some(refusal) = refusal(config, &error) {
            return Err(refusal);
        }
        if Instant::now() + RETRY_PAUSE > deadline {
            let waited = if patience.is_zero() {
                String::new()
            } else {
                format!(" (tried for {patience:?})")
            };
            return Err(anyhow!(error)).with_context(|| format!("no NATS server answered at {}{waited}", config.url));
        }
        if attempts == 1 || attempts % 10 == 0 {
            tracing::warn!(url = %config.url, "NATS not reachable yet ({error}); retrying for up to {patience:?}");
        }
        tokio::time::sleep(RETRY_PAUSE).await;
    }
}

fn is_tls(error: &async_nats::ConnectError) -> bool {
    error.kind() == ConnectErrorKind::Tls || error.to_string().contains("fatal alert")
}

/// A clear error when the server refused us, `None` when it was not there.
fn refusal(config: &NatsConfig, error: &async_nats::ConnectError) -> Option<anyhow::Error> {
    let auth = config.auth_kind();
    let why = match error.kind() {
        ConnectErrorKind::AuthorizationViolation => {
            format!(
                "NATS at {} refused the credentials (authentication: {auth}); check the nats.* settings and the \
                server's users",
                config.url
            )
        }
        ConnectErrorKind::Authentication => {
            format!(
                "could not answer the challenge of NATS at {} with the configured {auth} key",
                config.url
            )
        }
        // A server that rejects our client certificate ends the handshake
        // with a TLS alert, which async-nats reports as an IO error.
        ConnectErrorKind::Tls | ConnectErrorKind::Io if is_tls(error) => {
            format!(
                "TLS with NATS at {} failed; check nats.tls_ca_file, nats.tls_cert_file and nats.tls_key_file",
                config.url
            )
        }
        _ => return None,
    };
    Some(anyhow!("{error}").context(why))
}
