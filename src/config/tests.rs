//! The configuration's loading, layering and checks.

use super::*;
use crate::vae::adam::Schedule;
use crate::vae::device::DeviceChoice;

#[test]
fn defaults_parse() {
    let c = Config::load_with_env(None, []).unwrap();
    assert_eq!(c.model.z_size, 32);
    assert_eq!(c.train.batch_size, 100);
}

#[test]
fn environment_overrides_and_typos_fail() {
    let env = [
        ("WMVAE_TRAIN__BATCH_SIZE".to_string(), "64".to_string()),
        ("WMVAE_TRAIN__DEVICE".into(), "cpu".into()),
    ];
    let c = Config::load_with_env(None, env).unwrap();
    assert_eq!((c.train.batch_size, c.train.device), (64, DeviceChoice::Cpu));
    let err = Config::load_with_env(None, [("WMVAE_TRAIN__BATCH_SIZ".to_string(), "1".to_string())]).unwrap_err();
    assert!(err.to_string().contains("no key \"batch_siz\""), "{err}");
    assert!(
        err.to_string().contains("WMVAE_TRAIN__BATCH_SIZ:"),
        "names the variable: {err}"
    );
    assert!(Config::load_with_env(None, [("WMVAE_TRAIN__BATCH_SIZE".to_string(), "0".to_string())]).is_err());
}

#[test]
fn roles_parse_from_the_environment_and_refuse_typos() {
    let c = Config::load_with_env(None, []).unwrap();
    assert_eq!(
        c.serve.roles,
        Roles {
            trainer: true,
            encoder: true
        }
    );
    assert_eq!(c.serve.roles.to_string(), "trainer,encoder");
    let c = Config::load_with_env(None, [("WMVAE_SERVE__ROLES".to_string(), "encoder".to_string())]).unwrap();
    assert_eq!(
        c.serve.roles,
        Roles {
            trainer: false,
            encoder: true
        }
    );
    let err = format!(
        "{:#}",
        Config::load_with_env(None, [("WMVAE_SERVE__ROLES".to_string(), "trainer,encodr".to_string())]).unwrap_err()
    );
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
    let err = Config::load_with_env(Some(&path), []).unwrap_err().to_string();
    assert!(
        err.contains("unknown config section [trian]") && err.contains(&path.display().to_string()),
        "{err}"
    );
}

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

#[test]
fn secrets_never_print() {
    let c = Config::load_with_env(
        None,
        env(&[
            ("WMVAE_NATS__USER", "alice"),
            ("WMVAE_NATS__PASSWORD", "1234"),
            ("WMVAE_NATS__CONTROL_USER", "ctl"),
            ("WMVAE_NATS__CONTROL_PASSWORD", "5678"),
        ]),
    )
    .unwrap();
    // A numeric-looking password stays a string, exactly as given.
    assert_eq!(c.nats.password.expose(), Some("1234"));
    assert_eq!(c.nats.auth_kind(), "user/password");
    for shown in [
        format!("{c:?}"),
        toml::to_string(&c).unwrap(),
        serde_json::to_string(&c).unwrap(),
    ] {
        assert!(!shown.contains("1234") && !shown.contains("5678"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
    }
}

#[test]
fn early_checkpoints_double_until_the_cadence() {
    let c = Config::load_with_env(None, env(&[("WMVAE_TRAIN__FIRST_CHECKPOINT_STEPS", "50")])).unwrap();
    let early: Vec<u64> = (1..=5000).filter(|&s| c.train.is_early_checkpoint(s)).collect();
    assert_eq!(early, [50, 100, 200, 400, 800]);
    assert!(
        !(1..=5000).any(|s| Config::load(None).unwrap().train.is_early_checkpoint(s)),
        "off by default"
    );
}

#[test]
fn auth_settings_are_checked() {
    let refused = |pairs: &[(&str, &str)], says: &str| {
        let err = format!("{:#}", Config::load_with_env(None, env(pairs)).unwrap_err());
        assert!(err.contains(says), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
    };
    refused(
        &[("WMVAE_NATS__URL", "nats://bob:hunter2@host:4222")],
        "must not carry credentials",
    );
    refused(
        &[
            ("WMVAE_NATS__TOKEN", "hunter2"),
            ("WMVAE_NATS__USER", "bob"),
            ("WMVAE_NATS__PASSWORD", "hunter2"),
        ],
        "at most one",
    );
    refused(&[("WMVAE_NATS__PASSWORD", "hunter2")], "go together");
    refused(
        &[("WMVAE_NATS__CONTROL_PASSWORD", "hunter2")],
        "control_user and nats.control_password go together",
    );
    refused(&[("WMVAE_NATS__NKEY_SEED", "hunter2")], "not an nkey user seed");
    refused(
        &[("WMVAE_NATS__CREDS_FILE", "/nonexistent/x.creds")],
        "no file at /nonexistent/x.creds",
    );
    refused(&[("WMVAE_NATS__TLS_CERT_FILE", "/etc/hostname")], "go together");
    let seed = nkeys::KeyPair::new_user().seed().unwrap();
    let c = Config::load_with_env(None, env(&[("WMVAE_NATS__NKEY_SEED", &seed)])).unwrap();
    assert_eq!(c.nats.auth_kind(), "nkey");
}

/// Each layer wins over the one before: defaults, then the file, then the
/// environment.
#[test]
fn environment_overrides_file_overrides_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(
        &path,
        "[train]\nbatch_size = 50\nlearning_rate = 0.002\n[node]\nid = \"from-file\"\n",
    )
    .unwrap();
    let c = Config::load_with_env(
        Some(&path),
        env(&[("WMVAE_TRAIN__BATCH_SIZE", "64"), ("WMVAE_NODE__ID", "from-env")]),
    )
    .unwrap();
    assert_eq!(
        (c.train.batch_size, c.train.learning_rate, c.model.z_size),
        (64, 0.002, 32)
    );
    assert_eq!(c.node.id, "from-env");
    let c = Config::load_with_env(Some(&path), []).unwrap();
    assert_eq!((c.train.batch_size, c.node.id.as_str()), (50, "from-file"));
}

/// Under a key whose default is a string, a value stays exactly as
/// written, however numeric it looks; elsewhere it reads as TOML would
/// (`1e-4` a float to the last bit, not a string, not an f32).
#[test]
fn numeric_looking_strings_stay_strings() {
    let vars = [
        ("WMVAE_NATS__USER", "123"),
        ("WMVAE_NATS__PASSWORD", "0012"),
        ("WMVAE_NODE__ID", "007"),
        ("WMVAE_STORE__DATA_DIR", "42"),
    ];
    let c = Config::load_with_env(None, env(&vars)).unwrap();
    assert_eq!(
        (c.nats.user.as_str(), c.nats.password.expose(), c.node.id.as_str()),
        ("123", Some("0012"), "007")
    );
    assert_eq!(c.store.data_dir, std::path::PathBuf::from("42"));
    let c = Config::load_with_env(
        None,
        env(&[
            ("WMVAE_TRAIN__LEARNING_RATE", "1e-4"),
            ("WMVAE_TRAIN__MIN_LEARNING_RATE", "0.00001"),
        ]),
    )
    .unwrap();
    assert_eq!((c.train.learning_rate, c.train.min_learning_rate), (1e-4, 0.00001));
}

/// A misspelt key fails whether it comes from a file or the environment,
/// naming the key and the file or variable; so does a misspelt section.
/// Variables without a section (`WMVAE_BIN`) are not the config's.
#[test]
fn unknown_keys_fail_naming_key_and_origin() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, "[train]\nbatch_siz = 1\n").unwrap();
    let err = Config::load_with_env(Some(&path), []).unwrap_err().to_string();
    assert_eq!(
        err,
        format!("{}: no key \"batch_siz\" in config section [train]", path.display())
    );
    let err = Config::load_with_env(None, env(&[("WMVAE_HTTP__ADRR", "x")]))
        .unwrap_err()
        .to_string();
    assert_eq!(err, "WMVAE_HTTP__ADRR: no key \"adrr\" in config section [http]");
    let err = Config::load_with_env(None, env(&[("WMVAE_TRIAN__X", "1")]))
        .unwrap_err()
        .to_string();
    assert_eq!(err, "WMVAE_TRIAN__X: unknown config section [trian]");
    assert!(Config::load_with_env(None, env(&[("WMVAE_BIN", "x"), ("WMVAE_GYM", "required")])).is_ok());
}

/// A value of the wrong type names its key and origin; a file that isn't
/// there names its path; a secret of the wrong type is not echoed.
#[test]
fn bad_values_name_their_key_and_origin() {
    let err = format!(
        "{:#}",
        Config::load_with_env(None, env(&[("WMVAE_TRAIN__BATCH_SIZE", "abc")])).unwrap_err()
    );
    assert!(
        err.starts_with("invalid configuration: WMVAE_TRAIN__BATCH_SIZE: train.batch_size: invalid type"),
        "{err}"
    );
    let missing = std::path::Path::new("/nonexistent/wmvae.toml");
    let err = format!("{:#}", Config::load_with_env(Some(missing), []).unwrap_err());
    assert!(err.starts_with("reading config /nonexistent/wmvae.toml: "), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, "[nats]\nuser = \"bob\"\npassword = 987654\n").unwrap();
    let err = format!("{:#}", Config::load_with_env(Some(&path), []).unwrap_err());
    assert!(
        err.contains("nats.password") && err.contains("must be a string") && !err.contains("987654"),
        "{err}"
    );
}

/// `--check-config` prints every key of config/default.toml, no more, and
/// what it prints loads back to the same config; the schedule reaches Adam.
#[test]
fn printed_config_has_the_default_keys_and_loads_back() {
    let c = Config::load_with_env(None, []).unwrap();
    let printed: toml::Table = toml::to_string(&c).unwrap().parse().unwrap();
    let defaults: toml::Table = DEFAULT_TOML.parse().unwrap();
    let keys = |t: &toml::Table| -> Vec<String> {
        t.iter()
            .flat_map(|(s, v)| v.as_table().unwrap().keys().map(move |k| format!("{s}.{k}")))
            .collect()
    };
    let (mut printed_keys, mut default_keys) = (keys(&printed), keys(&defaults));
    printed_keys.sort();
    default_keys.sort();
    assert_eq!(printed_keys, default_keys);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, toml::to_string(&c).unwrap()).unwrap();
    assert_eq!(Config::load_with_env(Some(&path), []).unwrap(), c);
    let adam = c.adam();
    assert_eq!(
        (
            adam.schedule,
            adam.learning_rate,
            adam.warmup_steps,
            adam.decay_steps,
            adam.min_learning_rate
        ),
        (Schedule::WarmupCosine, 1e-3, 50, 10_000, 1e-4)
    );
}
