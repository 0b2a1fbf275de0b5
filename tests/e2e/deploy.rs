//! `deploy/`: the Kubernetes manifests agree with the config they ship
//! (ports, probe paths, mount paths, the filter directory, the upstream's
//! headless Service, the drain timing), the config passes `sluicegate
//! check`, and the container build file runs the same binary and ports.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize as _;
use serde_yaml::Value;

use crate::common::{describe, run_cli, TempDir};

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Every document of every manifest, by `Kind/name`.
fn manifests() -> BTreeMap<String, Value> {
    let dir = deploy_dir().join("kubernetes");
    let kustomization: Value =
        serde_yaml::from_str(&std::fs::read_to_string(dir.join("kustomization.yaml")).unwrap())
            .unwrap();
    let mut all = BTreeMap::new();
    for file in kustomization["resources"].as_sequence().expect("resources") {
        let path = dir.join(file.as_str().unwrap());
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v = Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: not YAML: {e}", path.display()));
            let key = format!(
                "{}/{}",
                v["kind"].as_str().expect("kind"),
                v["metadata"]["name"].as_str().expect("metadata.name")
            );
            assert!(all.insert(key.clone(), v).is_none(), "{key} defined twice");
        }
    }
    all
}

fn get<'a>(all: &'a BTreeMap<String, Value>, key: &str) -> &'a Value {
    all.get(key)
        .unwrap_or_else(|| panic!("no {key} in deploy/kubernetes; have {:?}", all.keys()))
}

/// A `host:port` TOML address's port.
fn port_of(addr: &str) -> u64 {
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

/// A container port given by number or by name.
fn resolve_port(container: &Value, port: &Value) -> u64 {
    if let Some(n) = port.as_u64() {
        return n;
    }
    let name = port.as_str().expect("port is a number or a name");
    container["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|p| p["name"].as_str() == Some(name))
        .and_then(|p| p["containerPort"].as_u64())
        .unwrap_or_else(|| panic!("no container port named {name}"))
}

/// The volume mounted at exactly `dir`, and its mount.
fn volume_at<'a>(pod: &'a Value, container: &'a Value, dir: &Path) -> (&'a Value, &'a Value) {
    let mount = container["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| Path::new(m["mountPath"].as_str().unwrap()) == dir)
        .unwrap_or_else(|| panic!("nothing is mounted at {}", dir.display()));
    let name = mount["name"].as_str().unwrap();
    let volume = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no volume {name}"));
    (volume, mount)
}

#[tokio::test]
async fn kubernetes_manifests_match_the_config_they_ship() {
    let all = manifests();
    let cm = get(&all, "ConfigMap/sluicegate-config");
    let deploy = get(&all, "Deployment/sluicegate");
    let pod = &deploy["spec"]["template"]["spec"];
    let container = &pod["containers"][0];

    // The container runs `run --config FILE`, FILE being a key of the
    // config ConfigMap mounted (whole, no subPath) at FILE's directory.
    let args: Vec<&str> = container["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(args[..2], ["run", "--config"]);
    let config_path = Path::new(args[2]);
    let (volume, mount) = volume_at(pod, container, config_path.parent().unwrap());
    assert_eq!(volume["configMap"]["name"], "sluicegate-config");
    assert!(
        mount.get("subPath").is_none(),
        "a subPath mount never sees updates"
    );
    let file = config_path.file_name().unwrap().to_str().unwrap();
    let text = cm["data"][file]
        .as_str()
        .unwrap_or_else(|| panic!("sluicegate-config has no key {file}"));
    let config: toml::Table = toml::from_str(text).expect("the shipped config is TOML");
    let proxy = config["proxy"].as_table().unwrap();

    // `sluicegate check` accepts it (the token file, a mounted Secret in
    // the pod, is stood in for by a temp file).
    let token_path = PathBuf::from(proxy["admin_token_file"].as_str().unwrap());
    let dir = TempDir::new("deploy");
    let token = dir.write("token", "test-token\n");
    let local = text.replace(token_path.to_str().unwrap(), token.to_str().unwrap());
    let local_path = dir.write("sluicegate.toml", local);
    let out = run_cli(&["check", "--config", local_path.to_str().unwrap()], 20).await;
    assert!(out.status.success(), "{}", describe(&out));

    // Ports: the proxy listener and the admin listener are container ports.
    let listen = port_of(proxy["listen"][0].as_str().unwrap());
    let admin = port_of(proxy["admin"].as_str().unwrap());
    assert!(
        proxy["admin"].as_str().unwrap().starts_with("0.0.0.0:"),
        "the kubelet probes the pod IP: admin must listen beyond loopback"
    );
    assert_eq!(resolve_port(container, &Value::from("http")), listen);
    assert_eq!(resolve_port(container, &Value::from("admin")), admin);

    // Probes: readiness on /readyz, liveness on /healthz, both on the admin
    // port (open without the admin token).
    let ready = &container["readinessProbe"]["httpGet"];
    let live = &container["livenessProbe"]["httpGet"];
    assert_eq!(ready["path"], "/readyz");
    assert_eq!(live["path"], "/healthz");
    assert_eq!(resolve_port(container, &ready["port"]), admin);
    assert_eq!(resolve_port(container, &live["port"]), admin);

    // The admin token file is in a mounted Secret.
    let (volume, _) = volume_at(pod, container, token_path.parent().unwrap());
    assert!(volume["secret"]["secretName"].is_string(), "{volume:?}");

    // The filter directory is the filters ConfigMap, mounted whole so an
    // update reaches the pod and hot-reloads.
    let filters = config["filters"].as_table().unwrap();
    let filter_dir = Path::new(filters["dir"].as_str().unwrap());
    let (volume, mount) = volume_at(pod, container, filter_dir);
    assert_eq!(volume["configMap"]["name"], "sluicegate-filters");
    assert!(
        mount.get("subPath").is_none(),
        "a subPath mount never sees updates"
    );
    get(&all, "ConfigMap/sluicegate-filters");
    // The artifact cache is writable (the root filesystem is read-only).
    let cache_dir = Path::new(filters["cache_dir"].as_str().unwrap());
    let (volume, _) = volume_at(pod, container, cache_dir);
    assert!(volume.get("emptyDir").is_some(), "{volume:?}");

    // The Service selects the pods and targets the proxy port.
    let svc = get(&all, "Service/sluicegate");
    let labels = &deploy["spec"]["template"]["metadata"]["labels"];
    for (k, v) in svc["spec"]["selector"].as_mapping().unwrap() {
        assert_eq!(&labels[k.as_str().unwrap()], v, "selector {k:?}");
    }
    assert_eq!(
        resolve_port(container, &svc["spec"]["ports"][0]["targetPort"]),
        listen
    );

    // Every upstream endpoint is a headless Service's DNS name and port.
    for up in config["upstream"].as_array().unwrap() {
        for ep in up["endpoints"].as_array().unwrap() {
            let ep = ep.as_str().unwrap();
            let (host, port) = ep.rsplit_once(':').unwrap();
            let parts: Vec<&str> = host.split('.').collect();
            assert!(
                host.ends_with(".svc.cluster.local") && parts.len() == 5,
                "{ep} is not NAME.NAMESPACE.svc.cluster.local:PORT"
            );
            let svc = get(&all, &format!("Service/{}", parts[0]));
            assert_eq!(svc["metadata"]["namespace"], parts[1], "{ep}");
            assert_eq!(svc["spec"]["clusterIP"], "None", "{ep}: not headless");
            let ports: Vec<u64> = svc["spec"]["ports"]
                .as_sequence()
                .unwrap()
                .iter()
                .map(|p| p["port"].as_u64().unwrap())
                .collect();
            assert!(ports.contains(&port.parse().unwrap()), "{ep}: {ports:?}");
        }
    }

    // Scaling out: several replicas, pointed at the Redis Service of the
    // manifests (NAME.NAMESPACE.svc.cluster.local:PORT).
    assert!(deploy["spec"]["replicas"].as_u64().unwrap() >= 3);
    let url = config["redis"]["url"].as_str().expect("[redis] url");
    let (host, port) = url
        .strip_prefix("redis://")
        .and_then(|a| a.rsplit_once(':'))
        .unwrap_or_else(|| panic!("{url} is not redis://HOST:PORT"));
    let parts: Vec<&str> = host.split('.').collect();
    assert!(
        host.ends_with(".svc.cluster.local") && parts.len() == 5,
        "{url}"
    );
    let svc = get(&all, &format!("Service/{}", parts[0]));
    assert_eq!(svc["metadata"]["namespace"], parts[1], "{url}");
    assert_eq!(
        svc["spec"]["ports"][0]["port"].as_u64(),
        port.parse().ok(),
        "{url}"
    );
    let redis = get(&all, &format!("Deployment/{}", parts[0]));
    for (k, v) in svc["spec"]["selector"].as_mapping().unwrap() {
        assert_eq!(
            &redis["spec"]["template"]["metadata"]["labels"][k.as_str().unwrap()],
            v
        );
    }

    // The drain finishes before the kubelet's SIGKILL.
    let timeouts = proxy["timeouts"].as_table().unwrap();
    let drain = timeouts["drain_delay_ms"].as_integer().unwrap()
        + timeouts["drain_ms"].as_integer().unwrap();
    let grace = pod["terminationGracePeriodSeconds"].as_i64().unwrap() * 1000;
    assert!(grace > drain, "grace {grace} ms <= drain {drain} ms");

    // The Prometheus annotations point at the admin port's /metrics.
    let ann = &deploy["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(ann["prometheus.io/port"], admin.to_string());
    assert_eq!(ann["prometheus.io/path"], "/metrics");

    // The image runs the binary with the same config path, exposing both ports.
    let containerfile = std::fs::read_to_string(deploy_dir().join("Containerfile")).unwrap();
    let expose = containerfile
        .lines()
        .find(|l| l.starts_with("EXPOSE "))
        .expect("EXPOSE");
    for port in [listen, admin] {
        assert!(
            expose.split_whitespace().any(|p| p == port.to_string()),
            "{expose}"
        );
    }
    assert!(containerfile.contains("ENTRYPOINT [\"/usr/local/bin/sluicegate\""));
    assert!(
        containerfile.contains(&format!("\"--config\", \"{}\"", config_path.display())),
        "the image's default config path differs from the Deployment's"
    );
    assert!(containerfile.contains("cargo build --release -p sluicegate"));
}
