//! docker compose, checked without a Docker engine: the files parse, every
//! build context, Dockerfile, config and mounted path exists, the daemon's
//! command line passes `wmvae serve --check-config` with the compose
//! environment, and every NATS URL names the `nats` service; both stacks
//! closed by default (roles, generated passwords, and for the cluster
//! authenticated routes), their NATS configs run on real nats-servers.

mod common;

use common::{repo_root, venv_python, wmvae};
use serde_json::Value;

/// A compose file as JSON, parsed by PyYAML from the venv.
fn compose(file: &str) -> Value {
    let script = "import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))";
    let out = std::process::Command::new(venv_python())
        .args(["-c", script])
        .arg(repo_root().join(file))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{file} does not parse: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_string)).collect())
        .unwrap_or_default()
}

/// The whole stack is wired: contexts, mounts, config, NATS URLs.
#[test]
fn compose_stack_is_consistent() {
    let doc = compose("docker-compose.yml");
    let services = doc["services"].as_object().unwrap();
    for name in ["nats", "wmvae", "publisher"] {
        assert!(services.contains_key(name), "service {name} missing");
    }
    for (name, service) in services {
        // `build: DIR` or `build: {context, dockerfile}`: the Dockerfile is there.
        let build = &service["build"];
        if let Some(context) = build.as_str().or(build["context"].as_str()) {
            let dockerfile = build["dockerfile"]
                .as_str()
                .map_or(repo_root().join(context).join("Dockerfile"), |f| {
                    repo_root().join(context).join(f)
                });
            assert!(dockerfile.is_file(), "{name}: no {}", dockerfile.display());
        }
        for volume in strings(&service["volumes"]) {
            let host = volume.split(':').next().unwrap();
            if host.starts_with("./") {
                assert!(repo_root().join(host).exists(), "{name}: mounted path {host} missing");
            } else {
                assert!(
                    doc["volumes"].get(host).is_some(),
                    "{name}: named volume {host} not declared"
                );
            }
        }
        for arg in strings(&service["command"]) {
            if arg.starts_with("nats://") {
                assert_eq!(arg, "nats://nats:4222", "{name} must reach the nats service");
            }
        }
    }
    // The publisher is the CarRacing example, in its own image.
    let publisher = std::fs::read_to_string(repo_root().join("examples/Dockerfile")).unwrap();
    // Built from the repository root: the image installs the Python package (python/).
    assert_eq!(
        (
            services["publisher"]["build"]["context"].as_str(),
            services["publisher"]["build"]["dockerfile"].as_str()
        ),
        (Some("."), Some("examples/Dockerfile"))
    );
    assert!(publisher.contains("gymnasium[box2d]") && publisher.contains("carracing_publisher.py"));
    for script in ["carracing_publisher.py", "wm_nats.py"] {
        assert!(
            publisher.contains(script) && repo_root().join("examples").join(script).is_file(),
            "{script}"
        );
    }
    let dockerfile = std::fs::read_to_string(repo_root().join("Dockerfile")).unwrap();
    assert!(dockerfile.contains("COPY config /etc/wmvae") && repo_root().join("config/compose.toml").is_file());
    assert!(repo_root().join("scripts/setup").is_file());

    // The daemon's command, with the compose environment, passes --check-config.
    let daemon = &services["wmvae"];
    let mut args = strings(&daemon["command"]);
    assert_eq!(args.first().map(String::as_str), Some("serve"));
    let config_in_image = args
        .iter()
        .position(|a| a == "--config")
        .map(|i| args[i + 1].clone())
        .unwrap();
    let local = repo_root()
        .join("config")
        .join(config_in_image.strip_prefix("/etc/wmvae/").unwrap());
    let i = args.iter().position(|a| a == "--config").unwrap();
    args[i + 1] = local.display().to_string();
    args.push("--check-config".into());
    let mut cmd = wmvae();
    cmd.args(&args);
    for (key, value) in daemon["environment"].as_object().unwrap() {
        cmd.env(key, value.as_str().unwrap());
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let checked: toml::Table = String::from_utf8(out.stdout).unwrap().parse().unwrap();
    assert_eq!(checked["nats"]["url"].as_str(), Some("nats://nats:4222"));
    assert_eq!(checked["http"]["addr"].as_str(), Some("0.0.0.0:9464"));

    // The GPU override reserves NVIDIA devices for the daemon.
    let gpu = compose("docker-compose.gpu.yml");
    let devices = &gpu["services"]["wmvae"]["deploy"]["resources"]["reservations"]["devices"][0];
    assert_eq!(devices["driver"], "nvidia");
    assert_eq!(devices["capabilities"][0], "gpu");
}

/// The cluster stack: three NATS nodes from config/cluster/, two trainer
/// nodes with distinct ids, two encoders, the publisher; every wmvae node's
/// environment passes `--check-config` and names all three servers.
#[test]
fn cluster_stack_is_consistent() {
    let doc = compose("docker-compose.cluster.yml");
    let services = doc["services"].as_object().unwrap();
    let mut ids = std::collections::HashSet::new();
    for (name, service) in services {
        for volume in strings(&service["volumes"]) {
            let host = volume.split(':').next().unwrap();
            if host.starts_with("./") {
                assert!(repo_root().join(host).exists(), "{name}: mounted path {host} missing");
            }
        }
        let args = strings(&service["command"]);
        if args.first().map(String::as_str) != Some("serve") {
            continue;
        }
        let mut cmd = wmvae();
        cmd.args(&args).arg("--check-config");
        for (key, value) in service["environment"].as_object().unwrap() {
            cmd.env(key, value.as_str().unwrap());
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        let checked: toml::Table = String::from_utf8(out.stdout).unwrap().parse().unwrap();
        assert_eq!(checked["nats"]["url"].as_str().unwrap().split(',').count(), 3, "{name}");
        assert_eq!(checked["nats"]["replicas"].as_integer(), Some(3), "{name}");
        assert!(
            ids.insert(checked["node"]["id"].as_str().unwrap().to_string()),
            "{name}: a node id twice"
        );
    }
    assert_eq!(ids.len(), 4, "two trainers and two encoders");
    for n in 1..=3 {
        let conf = std::fs::read_to_string(repo_root().join(format!("config/cluster/n{n}.conf"))).unwrap();
        assert!(
            conf.contains(&format!("server_name: n{n}"))
                && conf.contains("sync_interval: always")
                && conf.contains("routes")
        );
    }
}

/// The default stack is closed by default: NATS reachable from the host's
/// loopback only, running the roles of config/nats-permissions.conf, every
/// client with its own user, and the passwords generated once by
/// scripts/compose-secrets (run twice: kept); the daemon's generated
/// password logs in to a real nats-server with those roles, no password
/// does not.
#[test]
fn compose_runs_with_roles_and_generated_credentials() {
    let doc = compose("docker-compose.yml");
    let services = &doc["services"];
    for port in strings(&services["nats"]["ports"])
        .iter()
        .chain(&strings(&services["wmvae"]["ports"]))
    {
        assert!(port.starts_with("127.0.0.1:"), "{port} is published beyond this host");
    }
    assert!(strings(&services["nats"]["volumes"])
        .iter()
        .any(|v| v.starts_with("./config/nats-permissions.conf:/etc/nats/nats-permissions.conf")));
    let server_conf = std::fs::read_to_string(repo_root().join("config/nats-server.compose.conf")).unwrap();
    assert!(
        server_conf.lines().any(|l| l.trim() == "include nats-permissions.conf"),
        "{server_conf}"
    );
    for (service, user, password, inbox) in [
        ("wmvae", "wmvae", "WM_DAEMON_PASSWORD", None),
        (
            "publisher",
            "publisher",
            "WM_PUBLISHER_PASSWORD",
            Some("_INBOX_publisher"),
        ),
    ] {
        let env = &services[service]["environment"];
        assert_eq!(env["WMVAE_NATS__USER"].as_str(), Some(user), "{service}");
        assert!(
            env["WMVAE_NATS__PASSWORD"]
                .as_str()
                .unwrap()
                .starts_with(&format!("${{{password}:?")),
            "{service}"
        );
        assert_eq!(env["WMVAE_NATS__INBOX_PREFIX"].as_str(), inbox, "{service}");
    }
    let daemon = &services["wmvae"]["environment"];
    assert_eq!(daemon["WMVAE_NATS__CONTROL_USER"].as_str(), Some("wmvae-control"));
    assert!(daemon["WMVAE_NATS__CONTROL_PASSWORD"]
        .as_str()
        .unwrap()
        .starts_with("${WM_CONTROL_PASSWORD:?"));

    let dir = tempfile::tempdir().unwrap();
    let env_file = dir.path().join(".env");
    let generate = || {
        std::process::Command::new(repo_root().join("scripts/compose-secrets"))
            .arg(&env_file)
            .output()
            .unwrap()
    };
    assert!(generate().status.success());
    let first = std::fs::read_to_string(&env_file).unwrap();
    assert!(generate().status.success());
    assert_eq!(
        std::fs::read_to_string(&env_file).unwrap(),
        first,
        "a second run changed the passwords"
    );
    let passwords: std::collections::HashMap<&str, &str> = first.lines().filter_map(|l| l.split_once('=')).collect();
    let keys = [
        "WM_DAEMON_PASSWORD",
        "WM_PUBLISHER_PASSWORD",
        "WM_READER_PASSWORD",
        "WM_OPERATOR_PASSWORD",
        "WM_CONTROL_PASSWORD",
        "WM_ROUTE_PASSWORD",
    ];
    for key in keys {
        assert!(passwords.get(key).is_some_and(|p| p.len() >= 20), "{key} in {first}");
    }
    assert_eq!(
        passwords.values().collect::<std::collections::HashSet<_>>().len(),
        keys.len(),
        "passwords repeat"
    );
    // An .env from before a role existed gets that role's password, and keeps the others.
    let older: String = first
        .lines()
        .filter(|l| !l.starts_with("WM_CONTROL_PASSWORD="))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&env_file, &older).unwrap();
    assert!(generate().status.success());
    let topped_up = std::fs::read_to_string(&env_file).unwrap();
    assert!(
        topped_up.starts_with(&older) && topped_up.contains("WM_CONTROL_PASSWORD="),
        "{topped_up}"
    );

    // A real server with the roles and the generated passwords.
    // (The route password is the cluster's: a single server has no routes to use it in.)
    let variables: String = passwords
        .iter()
        .filter(|(k, _)| **k != "WM_ROUTE_PASSWORD")
        .map(|(k, v)| format!("{k}: \"{v}\"\n"))
        .collect();
    let roles = std::fs::read_to_string(repo_root().join("config/nats-permissions.conf")).unwrap();
    let server = wmvae_bench::nats_server::LocalNats::start_with(
        &repo_root().join(".venv/bin/nats-server"),
        &format!("{variables}{roles}"),
    )
    .unwrap();
    let migrate = |password: Option<&str>| {
        let mut cmd = wmvae();
        cmd.args(["migrate", "--nats-url", &server.url]);
        if let Some(password) = password {
            cmd.env("WMVAE_NATS__USER", "wmvae")
                .env("WMVAE_NATS__PASSWORD", password);
        }
        cmd.output().unwrap()
    };
    let out = migrate(Some(passwords["WM_DAEMON_PASSWORD"]));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains(passwords["WM_DAEMON_PASSWORD"]),
        "the password was printed"
    );
    assert!(!migrate(None).status.success(), "an anonymous client got in");
}

/// Issue #26: the cluster stack is as closed as the single node. Every NATS
/// node runs the roles of config/nats-permissions.conf (mounted beside its
/// config) with the generated passwords, authenticates the routes between
/// the servers, and listens on the host's loopback; every wmvae node and
/// the publisher log in as their own user. Then the three configs run, as
/// written (ports and stores moved to free ones), on real nats-servers with
/// those passwords: the routes form a JetStream cluster, the daemon's user
/// gets in, an anonymous client and a route with a wrong password do not.
#[test]
fn cluster_runs_with_roles_and_authenticated_routes() {
    let doc = compose("docker-compose.cluster.yml");
    let services = doc["services"].as_object().unwrap();
    for n in 1..=3 {
        let node = &services[&format!("nats{n}")];
        assert!(strings(&node["volumes"])
            .iter()
            .any(|v| v.starts_with("./config/nats-permissions.conf:/etc/nats/nats-permissions.conf")));
        let env = &node["environment"];
        for key in ["WM_DAEMON_PASSWORD", "WM_CONTROL_PASSWORD", "WM_ROUTE_PASSWORD"] {
            assert!(
                env[key].as_str().unwrap().starts_with(&format!("${{{key}:?")),
                "nats{n}: {key}"
            );
        }
        for r in 1..=3 {
            let route = env[&format!("WM_ROUTE_{r}")].as_str().unwrap();
            assert_eq!(
                route,
                format!("nats-route://route:${{WM_ROUTE_PASSWORD}}@127.0.0.1:{}", 6221 + r)
            );
        }
    }
    for (name, service) in services {
        let env = &service["environment"];
        match name.as_str() {
            n if n.starts_with("nats") => {}
            "publisher" => assert_eq!(env["WMVAE_NATS__USER"].as_str(), Some("publisher")),
            _ => {
                assert_eq!(env["WMVAE_NATS__USER"].as_str(), Some("wmvae"), "{name}");
                assert!(env["WMVAE_NATS__PASSWORD"]
                    .as_str()
                    .unwrap()
                    .starts_with("${WM_DAEMON_PASSWORD:?"));
                assert_eq!(
                    env["WMVAE_NATS__CONTROL_USER"].as_str(),
                    Some("wmvae-control"),
                    "{name}"
                );
            }
        }
    }

    // The three configs on real servers, with passwords as compose-secrets makes them.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        repo_root().join("config/nats-permissions.conf"),
        dir.path().join("nats-permissions.conf"),
    )
    .unwrap();
    let ports: Vec<u16> = (0..6).map(|_| common::free_port()).collect();
    let password = |role: &str| format!("{role}-password-for-this-test");
    let route = |r: usize, password: &str| format!("nats-route://route:{password}@127.0.0.1:{}", ports[3 + r]);
    let mut servers: Vec<ChildGuard> = (0..3)
        .map(|i| {
            let conf = std::fs::read_to_string(repo_root().join(format!("config/cluster/n{}.conf", i + 1)))
                .unwrap()
                .replace(&format!("127.0.0.1:{}", 4222 + i), &format!("127.0.0.1:{}", ports[i]))
                .replace(
                    &format!("127.0.0.1:{}", 6222 + i),
                    &format!("127.0.0.1:{}", ports[3 + i]),
                )
                .replace(
                    &format!("\"data/nats-n{}\"", i + 1),
                    &format!("{:?}", dir.path().join(format!("js{i}"))),
                );
            let path = dir.path().join(format!("n{}.conf", i + 1));
            std::fs::write(&path, conf).unwrap();
            let mut cmd = std::process::Command::new(repo_root().join(".venv/bin/nats-server"));
            cmd.arg("-c").arg(&path).stderr(std::process::Stdio::null());
            for role in ["DAEMON", "PUBLISHER", "READER", "OPERATOR", "CONTROL", "ROUTE"] {
                cmd.env(format!("WM_{role}_PASSWORD"), password(role));
            }
            for r in 0..3 {
                cmd.env(format!("WM_ROUTE_{}", r + 1), route(r, &password("ROUTE")));
            }
            ChildGuard(cmd.spawn().unwrap())
        })
        .collect();
    let url: Vec<String> = ports[..3].iter().map(|p| format!("nats://127.0.0.1:{p}")).collect();
    let migrate = |user: Option<&str>| {
        let mut cmd = wmvae();
        cmd.args(["migrate", "--nats-url", &url.join(","), "--data-dir"])
            .arg(dir.path().join("store"))
            .env("WMVAE_NATS__REPLICAS", "3");
        if let Some(password) = user {
            cmd.env("WMVAE_NATS__USER", "wmvae")
                .env("WMVAE_NATS__PASSWORD", password);
        }
        cmd.output().unwrap()
    };
    // Three replicas need the cluster's routes up and a JetStream meta leader.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let out = migrate(Some(&password("DAEMON")));
        if out.status.success() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the cluster never took 3-replica streams: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    assert!(!migrate(None).status.success(), "an anonymous client got in");

    // A fourth server whose route presents a wrong password joins nothing.
    let log = dir.path().join("intruder.log");
    let intruder_port = common::free_port();
    std::fs::write(
        dir.path().join("intruder.conf"),
        format!(
            "listen: 127.0.0.1:{intruder_port}\ncluster {{ name: wmvae, listen: 127.0.0.1:{}, routes: [{}] }}\n",
            common::free_port(),
            route(0, "wrong")
        ),
    )
    .unwrap();
    servers.push(ChildGuard(
        std::process::Command::new(repo_root().join(".venv/bin/nats-server"))
            .arg("-c")
            .arg(dir.path().join("intruder.conf"))
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    ));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !std::fs::read_to_string(&log)
        .unwrap()
        .contains("Authorization Violation")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the intruder's route was not refused"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// A child process killed when the test ends, passing or not.
struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
