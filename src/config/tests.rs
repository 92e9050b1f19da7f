//! The configuration's loading, layering and checks.

use super::*;
use crate::vae::device::DeviceChoice;

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

