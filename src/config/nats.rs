//! The `[nats]` section: where the server is, the subject and inbox
//! prefixes, and how to authenticate; and [`Secret`], the credential that
//! redacts itself. This module checks the section; it connects to nothing
//! (`bus::connection` reads the secrets and dials).

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

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

    /// Checks the section: subject tokens, replicas, then authentication.
    /// No message carries a secret.
    pub fn validate(&self) -> Result<()> {
        if self.prefix.is_empty() || self.prefix.contains(['.', '*', '>', ' ']) {
            bail!("nats.prefix must be one subject token (no '.', '*', '>' or spaces)");
        }
        if self.inbox_prefix.is_empty() || self.inbox_prefix.contains(['.', '*', '>', ' ']) {
            bail!("nats.inbox_prefix must be one subject token (no '.', '*', '>' or spaces), such as _INBOX_operator");
        }
        self.validate_auth()?;
        if !(1..=5).contains(&self.replicas) {
            bail!("nats.replicas must be in 1..=5 (JetStream's limit)");
        }
        Ok(())
    }

    fn validate_auth(&self) -> Result<()> {
        for server in self.url.split(',') {
            let authority = server.split_once("://").map_or(server, |(_, rest)| rest);
            if authority.split('/').next().unwrap_or_default().contains('@') {
                bail!(
                    "nats.url must not carry credentials: set nats.user and nats.password (or WMVAE_NATS__PASSWORD) \
                    so they stay out of logs"
                );
            }
        }
        let ways = [
            self.password.is_set(),
            self.token.is_set(),
            self.nkey_seed.is_set(),
            !self.creds_file.is_empty(),
        ];
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
/// checkpoint metadata never carry it, and reading one that is not a
/// string fails without echoing it.
#[derive(Clone, Default, PartialEq)]
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
        if self.is_set() {
            Self::SHOWN_AS
        } else {
            ""
        }
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

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> std::result::Result<Secret, D::Error> {
        deserializer.deserialize_string(SecretVisitor)
    }
}

/// Takes a string; refuses anything else without naming the value, which
/// serde's own "invalid type: integer `1234`" would.
struct SecretVisitor;

impl SecretVisitor {
    fn refuse<E: serde::de::Error>(&self) -> std::result::Result<Secret, E> {
        Err(E::custom("a secret must be a string (quoted, in a TOML file)"))
    }
}

impl serde::de::Visitor<'_> for SecretVisitor {
    type Value = Secret;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a string")
    }

    fn visit_str<E: serde::de::Error>(self, value: &str) -> std::result::Result<Secret, E> {
        Ok(Secret::new(value))
    }

    fn visit_bool<E: serde::de::Error>(self, _: bool) -> std::result::Result<Secret, E> {
        self.refuse()
    }

    fn visit_i64<E: serde::de::Error>(self, _: i64) -> std::result::Result<Secret, E> {
        self.refuse()
    }

    fn visit_u64<E: serde::de::Error>(self, _: u64) -> std::result::Result<Secret, E> {
        self.refuse()
    }

    fn visit_f64<E: serde::de::Error>(self, _: f64) -> std::result::Result<Secret, E> {
        self.refuse()
    }
}
