//! The container back end: the same topologies as [`crate::LocalProcesses`],
//! run from the project's own images (`docker/`), so that what local
//! processes cannot show is testable: a node cut off from the network while
//! it keeps running, a frozen node, the cluster exactly as users deploy it.
//!
//! Nodes and the proxy are started with the `testcontainers` crate (images
//! built locally by `docker/build.sh`; nothing is pulled), each topology on a
//! network of its own; [`ComposeCluster`] starts `docker/compose.yml` as
//! users do. Faults the crate has no call for (a network cut) go through the
//! `docker` command. Built only with the `containers` feature.

use crate::{Backend, Env};
use anyhow::{bail, Context as _, Result};
use shardline::cluster::NodeInfo;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use testcontainers::core::{ContainerPort, WaitFor};
use testcontainers::runners::AsyncRunner;
use testcontainers::{ContainerAsync, GenericImage, ImageExt};

/// The images' tag (`docker/build.sh --tag`).
pub const TAG: &str = "dev";
const POSTGRES_IMAGE: &str = "shardline-postgres";
const SHARDLINE_IMAGE: &str = "shardline";

/// The `docker` command (`DOCKER` overrides).
pub fn docker() -> Command {
    Command::new(std::env::var("DOCKER").unwrap_or_else(|_| "docker".into()))
}

/// Runs a command; its stdout, or an error with its output.
fn checked(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the repository")
        .to_path_buf()
}

/// Builds the images once per test process: the Shardline image from the
/// debug binary the process tests use (`docker/build.sh --binary`), and the
/// Postgres node image. Docker's layer cache makes
/// a rebuild of unchanged images take seconds.
pub fn ensure_images() -> Result<()> {
    static BUILT: std::sync::Mutex<Option<bool>> = std::sync::Mutex::new(None);
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    match *built {
        Some(true) => return Ok(()),
        Some(false) => bail!("building the images failed earlier in this run"),
        None => {}
    }
    if let Err(e) = checked(docker().args(["version", "--format", "{{.Server.Version}}"])) {
        *built = Some(false);
        bail!("no Docker engine answers (scripts/test.sh installs and starts one): {e}");
    }
    let result = crate::shardline_binary().and_then(|binary| {
        checked(
            Command::new(repo_root().join("docker/build.sh"))
                .arg("--binary")
                .arg(binary)
                .args(["--tag", TAG])
                .current_dir(repo_root()),
        )
    });
    *built = Some(result.is_ok());
    result.map(drop)
}

/// A name no other topology of this run (or a concurrent run) uses.
fn unique_prefix() -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!(
        "sl{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// How the containers of a cluster are owned: removed on drop either way.
enum Owner {
    Testcontainers {
        _nodes: Vec<ContainerAsync<GenericImage>>,
        proxy: Option<Box<ContainerAsync<GenericImage>>>,
    },
    Compose {
        _project: ComposeProject,
    },
}

/// Postgres nodes (and a Shardline) in containers, on one network.
pub struct ContainerCluster {
    nodes: Vec<NodeInfo>,
    /// Container ids, in `nodes` order.
    ids: Vec<String>,
    /// Each node's name on the network (what the proxy's config names).
    hosts: Vec<String>,
    network: String,
    /// The Shardline container's id, when one runs.
    pub proxy_id: Option<String>,
    owner: Owner,
}

impl ContainerCluster {
    /// `shards` primaries with `replicas` streaming replicas each, on a
    /// network of their own.
    pub async fn start(shards: usize, replicas: usize) -> Result<ContainerCluster> {
        ensure_images()?;
        let prefix = unique_prefix();
        let network = format!("{prefix}-net");
        let node = |host: &str| {
            GenericImage::new(POSTGRES_IMAGE, TAG)
                .with_wait_for(WaitFor::healthcheck())
                .with_network(network.clone())
                .with_container_name(host)
                .with_env_var("POSTGRES_PASSWORD", "postgres")
                .with_startup_timeout(Duration::from_secs(120))
        };
        let mut infos = Vec::new();
        let mut starting = Vec::new();
        for s in 0..shards {
            let host = format!("{prefix}-s{s}-primary");
            starting.push(node(&host).start());
            infos.push((format!("s{s}"), true, host));
        }
        let mut containers = futures_util::future::try_join_all(starting).await?;
        let mut starting = Vec::new();
        for s in 0..shards {
            for r in 0..replicas {
                let host = format!("{prefix}-s{s}-replica{r}");
                starting.push(
                    node(&host)
                        .with_env_var("ROLE", "replica")
                        .with_env_var("PRIMARY_HOST", format!("{prefix}-s{s}-primary"))
                        .start(),
                );
                infos.push((format!("s{s}"), false, host));
            }
        }
        containers.extend(futures_util::future::try_join_all(starting).await?);
        // Cluster order as LocalCluster has it: each shard's primary, then its replicas.
        let mut order: Vec<usize> = (0..infos.len()).collect();
        order.sort_by_key(|&i| (infos[i].0.clone(), !infos[i].1, infos[i].2.clone()));
        let nodes = order
            .iter()
            .map(|&i| NodeInfo {
                name: infos[i].2.clone(),
                shard: infos[i].0.clone(),
                is_primary: infos[i].1,
                port: 5432,
                data_dir: PathBuf::new(),
                socket_dir: PathBuf::new(),
            })
            .collect();
        let ids = order
            .iter()
            .map(|&i| containers[i].id().to_string())
            .collect();
        let hosts = order.iter().map(|&i| infos[i].2.clone()).collect();
        Ok(ContainerCluster {
            nodes,
            ids,
            hosts,
            network,
            proxy_id: None,
            owner: Owner::Testcontainers {
                _nodes: containers,
                proxy: None,
            },
        })
    }

    /// `[[shards]]` entries naming the nodes by their network names.
    pub fn shards_toml(&self) -> String {
        let mut toml = String::new();
        let mut shards: Vec<&str> = self.nodes.iter().map(|n| n.shard.as_str()).collect();
        shards.dedup();
        for shard in shards {
            let of = |primary: bool| {
                self.nodes
                    .iter()
                    .zip(&self.hosts)
                    .filter(move |(n, _)| n.shard == shard && n.is_primary == primary)
                    .map(|(_, h)| format!("{{ host = \"{h}\", port = 5432 }}"))
            };
            let primary = of(true).next().expect("a primary");
            let replicas: Vec<String> = of(false).collect();
            toml.push_str(&format!(
                "[[shards]]\nname = \"{shard}\"\nprimary = {primary}\nreplicas = [{}]\n\n",
                replicas.join(", ")
            ));
        }
        toml
    }

    /// Starts the Shardline image on the cluster's network with `config`
    /// (its `[proxy] listen` must be `0.0.0.0:6432`) and returns an [`Env`]
    /// whose port reaches it from the host (published on 127.0.0.1 only).
    pub async fn with_proxy(mut self, config: String) -> Result<Env> {
        let Owner::Testcontainers { proxy, .. } = &mut self.owner else {
            bail!("a compose cluster runs its own proxy");
        };
        let container = GenericImage::new(SHARDLINE_IMAGE, TAG)
            .with_exposed_port(ContainerPort::Tcp(6432))
            .with_wait_for(WaitFor::message_on_either_std("shardline listening"))
            .with_network(self.network.clone())
            .with_container_name(format!(
                "{}-shardline",
                self.network.trim_end_matches("-net")
            ))
            .with_copy_to("/etc/shardline/shardline.toml", config.clone().into_bytes())
            .with_startup_timeout(Duration::from_secs(60))
            .with_host_config_modifier(|hc| {
                let binding = testcontainers::bollard::models::PortBinding {
                    host_ip: Some("127.0.0.1".into()),
                    host_port: Some(String::new()),
                };
                hc.publish_all_ports = Some(false);
                hc.port_bindings = Some([("6432/tcp".to_string(), Some(vec![binding]))].into());
            })
            .start()
            .await
            .context("starting the Shardline image")?;
        let port = container.get_host_port_ipv4(6432).await?;
        self.proxy_id = Some(container.id().to_string());
        *proxy = Some(Box::new(container));
        Ok(Env {
            backend: Box::new(self),
            proxy: None,
            port,
            config_text: config,
        })
    }

    fn id(&self, index: usize) -> &str {
        &self.ids[index]
    }

    /// Cuts node `index` off its network while it keeps running.
    pub fn disconnect(&self, index: usize) -> Result<()> {
        checked(docker().args(["network", "disconnect", &self.network, self.id(index)])).map(drop)
    }

    /// Puts node `index` back on its network under the same name.
    pub fn reconnect(&self, index: usize) -> Result<()> {
        checked(docker().args([
            "network",
            "connect",
            "--alias",
            &self.hosts[index],
            &self.network,
            self.id(index),
        ]))
        .map(drop)
    }

    /// Freezes node `index` (every process stopped; its sockets stay open).
    pub fn pause(&self, index: usize) -> Result<()> {
        checked(docker().args(["pause", self.id(index)])).map(drop)
    }

    pub fn unpause(&self, index: usize) -> Result<()> {
        checked(docker().args(["unpause", self.id(index)])).map(drop)
    }

    /// `docker stop -t <grace>` of the Shardline container (SIGTERM, then
    /// SIGKILL after the grace time); returns how long it took.
    pub fn stop_proxy(&self, grace: Duration) -> Result<Duration> {
        let id = self.proxy_id.as_deref().context("no Shardline container")?;
        let started = Instant::now();
        checked(docker().args(["stop", "-t", &grace.as_secs().to_string(), id]))?;
        Ok(started.elapsed())
    }

    /// The Shardline container's exit code and log.
    pub fn proxy_exit(&self) -> Result<(i64, String)> {
        let id = self.proxy_id.as_deref().context("no Shardline container")?;
        let code = checked(docker().args(["inspect", "-f", "{{.State.ExitCode}}", id]))?;
        let out = docker().args(["logs", id]).output()?;
        Ok((
            code.parse()?,
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        ))
    }

    fn wait_ready(&self, index: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let ok = docker()
                .args([
                    "exec",
                    self.id(index),
                    "pg_isready",
                    "-q",
                    "-h",
                    "127.0.0.1",
                ])
                .stdin(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("node {} is not ready after {timeout:?}", self.hosts[index]);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// The container cluster behind an [`Env`] started by this module.
pub fn cluster(env: &Env) -> &ContainerCluster {
    env.backend
        .as_any()
        .downcast_ref()
        .expect("an Env on containers")
}

impl Backend for ContainerCluster {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn nodes(&self) -> &[NodeInfo] {
        &self.nodes
    }

    fn psql(&self, node: &NodeInfo, database: &str, sql: &str) -> Result<String> {
        use std::io::Write as _;
        let index = self
            .nodes
            .iter()
            .position(|n| n.name == node.name)
            .context("a node of this cluster")?;
        let mut child = docker()
            .args(["exec", "-i", self.id(index), "psql", "-X", "-q", "-A", "-t"])
            .args([
                "-v",
                "ON_ERROR_STOP=1",
                "-U",
                "postgres",
                "-d",
                database,
                "-f",
                "-",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("docker exec psql")?;
        child
            .stdin
            .take()
            .context("psql's stdin")?
            .write_all(sql.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "psql on {} failed: {}",
                node.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// `fast`: `docker stop` (SIGINT, the image's stop signal: a fast
    /// shutdown); `immediate`: `docker kill` (SIGKILL).
    fn stop_node(&self, index: usize, mode: &str) -> Result<()> {
        match mode {
            "immediate" => checked(docker().args(["kill", self.id(index)])).map(drop),
            _ => checked(docker().args(["stop", "-t", "30", self.id(index)])).map(drop),
        }
    }

    fn start_node(&self, index: usize) -> Result<()> {
        checked(docker().args(["start", self.id(index)]))?;
        self.wait_ready(index, Duration::from_secs(60))
    }

    fn wait_replicas_caught_up(&self, timeout: Duration) -> Result<()> {
        shardline::cluster::wait_caught_up(
            &self.nodes,
            |n, sql| self.psql(n, "postgres", sql),
            timeout,
        )
    }

    fn enable_tls(&self, _index: usize) -> Result<()> {
        bail!("TLS between the proxy and containers is not set up by this back end")
    }
}

/// A `docker/compose.yml` project, brought down (volumes included) on drop.
pub struct ComposeProject {
    name: String,
}

impl ComposeProject {
    /// `docker compose` where the plugin exists, else Debian's `docker-compose`.
    fn command(&self) -> Command {
        let plugin = docker()
            .args(["compose", "version"])
            .stdin(Stdio::null())
            .output()
            .is_ok_and(|o| o.status.success());
        let mut cmd = if plugin {
            let mut c = docker();
            c.arg("compose");
            c
        } else {
            Command::new("docker-compose")
        };
        cmd.args(["-p", &self.name, "-f"])
            .arg(repo_root().join("docker/compose.yml"))
            .env("SHARDLINE_TAG", TAG);
        cmd
    }

    /// The id of a service's container.
    fn container(&self, service: &str) -> Result<String> {
        let id = checked(self.command().args(["ps", "-q", service]))?;
        anyhow::ensure!(!id.is_empty(), "no container for service {service}");
        Ok(id)
    }
}

impl Drop for ComposeProject {
    fn drop(&mut self) {
        let _ = self
            .command()
            .args(["down", "-v", "--timeout", "5"])
            .stdin(Stdio::null())
            .output();
    }
}

/// The compose cluster as users start it: `docker compose up` of
/// `docker/compose.yml`, the proxy published on a free loopback port, the
/// demo data loaded through it.
pub struct ComposeCluster;

impl ComposeCluster {
    pub async fn start() -> Result<Env> {
        ensure_images()?;
        let project = ComposeProject {
            name: unique_prefix(),
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        tokio::task::spawn_blocking(move || -> Result<Env> {
            checked(
                project
                    .command()
                    .args(["up", "-d", "--no-build"])
                    .env("SHARDLINE_PORT", port.to_string()),
            )?;
            // The one-shot loader ends when the data is in.
            let loader = project.container("demo-data")?;
            let code = checked(docker().args(["wait", &loader]))?;
            if code != "0" {
                let log = docker().args(["logs", &loader]).output()?;
                bail!(
                    "loading the demo data failed ({code}): {}",
                    String::from_utf8_lossy(&log.stderr)
                );
            }
            let mut nodes = Vec::new();
            let mut ids = Vec::new();
            let mut hosts = Vec::new();
            for s in 0..2 {
                for (service, primary) in [
                    (format!("s{s}-primary"), true),
                    (format!("s{s}-replica"), false),
                ] {
                    ids.push(project.container(&service)?);
                    nodes.push(NodeInfo {
                        name: service.clone(),
                        shard: format!("s{s}"),
                        is_primary: primary,
                        port: 5432,
                        data_dir: PathBuf::new(),
                        socket_dir: PathBuf::new(),
                    });
                    hosts.push(service);
                }
            }
            let proxy_id = Some(project.container("shardline")?);
            let network = format!("{}_default", project.name);
            let config = std::fs::read_to_string(repo_root().join("docker/shardline.toml"))?;
            Ok(Env {
                backend: Box::new(ContainerCluster {
                    nodes,
                    ids,
                    hosts,
                    network,
                    proxy_id,
                    owner: Owner::Compose { _project: project },
                }),
                proxy: None,
                port,
                config_text: config,
            })
        })
        .await?
    }
}
