//! Where the configuration's values come from, layered with figment: the
//! compiled-in defaults, then the optional file, then `WMVAE_<SECTION>__<KEY>`
//! environment variables; and figment's errors told as the key and the
//! place (file or variable) it came from. It reads; it checks no bounds.
//!
//! The environment is a provider of our own rather than figment's `Env`:
//! `Config::load_with_env` takes the variables as given (tests run side by
//! side and can't share the process's environment), and a value is typed by
//! its key's default, as TOML would read it, except under a key whose
//! default is a string, where it stays as written: a password `0012` stays
//! `0012` (figment's `Env` would read it as the number 12, and `1e-4` as a
//! string).

use anyhow::{anyhow, Context, Result};
use figment::error::{Kind, OneOf};
use figment::providers::{Format, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider, Source};
use std::path::Path;

/// Prefix of overriding environment variables.
const ENV_PREFIX: &str = "WMVAE_";
/// Splits a variable's name into section and key.
const ENV_SPLIT: &str = "__";

/// The layers, later over earlier: `defaults` (TOML), `file`, `env`.
pub(super) fn layers(
    defaults: &str,
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Figment> {
    let typed_by: toml::Table = defaults.parse().context("built-in config/default.toml")?;
    let mut figment = Figment::from(Toml::string(defaults));
    if let Some(path) = file {
        figment = figment.merge(Toml::file_exact(path));
    }
    Ok(figment.merge(EnvOverlay::new(env, &typed_by)))
}

/// `WMVAE_<SECTION>__<KEY>` variables as `section.key` (names lower-cased;
/// others, such as `WMVAE_BIN`, ignored), each value typed by the key's
/// default in `defaults`. Keys that are not there are kept, for the
/// deserializer to refuse by name.
struct EnvOverlay {
    overlay: toml::Table,
}

impl EnvOverlay {
    fn new(vars: impl IntoIterator<Item = (String, String)>, defaults: &toml::Table) -> EnvOverlay {
        let mut overlay = toml::Table::new();
        for (name, raw) in vars {
            let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let Some((section, key)) = rest.split_once(ENV_SPLIT) else {
                continue;
            };
            let (section, key) = (section.to_lowercase(), key.to_lowercase());
            let default = defaults
                .get(&section)
                .and_then(toml::Value::as_table)
                .and_then(|table| table.get(&key));
            let value = match default {
                Some(toml::Value::String(_)) => toml::Value::String(raw),
                _ => parse_env_value(&raw),
            };
            let table = overlay
                .entry(section)
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if let toml::Value::Table(table) = table {
                table.insert(key, value);
            }
        }
        EnvOverlay { overlay }
    }
}

impl Provider for EnvOverlay {
    fn metadata(&self) -> Metadata {
        Metadata::named("the environment").interpolater(|_: &Profile, keys: &[&str]| {
            let keys: Vec<String> = keys.iter().map(|key| key.to_uppercase()).collect();
            format!("{ENV_PREFIX}{}", keys.join(ENV_SPLIT))
        })
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let dict = Value::serialize(&self.overlay)?
            .into_dict()
            .ok_or_else(|| figment::Error::from("the environment's overlay is not a table"))?;
        Ok(Profile::Default.collect(dict))
    }
}

/// `500` is an integer, `1e-4` a float, `true` a bool, anything else a string.
fn parse_env_value(raw: &str) -> toml::Value {
    match format!("v = {raw}").parse::<toml::Table>() {
        Ok(mut t) => t.remove("v").unwrap_or_else(|| toml::Value::String(raw.to_string())),
        Err(_) => toml::Value::String(raw.to_string()),
    }
}

/// A figment error as the key and where it came from: the file's path or
/// the variable's name. Unknown sections and keys say so plainly; other
/// errors come under "invalid configuration" (type, value), or "reading
/// config" (a file that can't be read or parsed).
pub(super) fn explain(error: figment::Error, figment: &Figment) -> anyhow::Error {
    let mut path = error.path.clone();
    if let (Kind::UnknownField(..), [section]) = (&error.kind, path.as_slice()) {
        // The variable that made an unknown section is named by one of its keys.
        if let Some(key) = figment
            .find_value(section)
            .ok()
            .and_then(|v| v.into_dict())
            .and_then(|d| d.into_keys().next())
        {
            path.push(key);
        }
    }
    let origin = error
        .metadata
        .as_ref()
        .map_or_else(|| "the configuration".to_string(), |md| origin(md, &path));
    let what = match &error.kind {
        Kind::UnknownVariant(found, expected) => format!("unknown variant `{found}`, expected {}", OneOf(expected)),
        kind => kind.to_string().trim_end().to_string(),
    };
    match (&error.kind, error.path.as_slice()) {
        (Kind::UnknownField(..), [section]) => anyhow!("{origin}: unknown config section [{section}]"),
        (Kind::UnknownField(..), [section, key]) => anyhow!("{origin}: no key {key:?} in config section [{section}]"),
        (_, []) => anyhow!("{what}").context(format!("reading config {origin}")),
        (_, path) => anyhow!("{origin}: {}: {what}", path.join(".")).context("invalid configuration"),
    }
}

/// A file's path, or for the environment the variable's name.
fn origin(md: &Metadata, path: &[String]) -> String {
    match &md.source {
        Some(Source::File(file)) => file.display().to_string(),
        _ if path.is_empty() => md.name.to_string(),
        _ => md.interpolate(&Profile::Default, path),
    }
}
