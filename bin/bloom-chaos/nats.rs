//! The NATS servers under test: one server, or a three-node JetStream cluster on loopback
//! (routes on loopback ports, a store directory each), with what the cluster scenarios
//! need: which server leads a stream, and when a restarted server has caught up.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::{free_port, wait_port, Service};

/// The NATS servers of a run.
pub struct Nats {
    pub servers: Vec<Service>,
    ports: Vec<u16>,
    monitor_ports: Vec<u16>,
}

impl Nats {
    /// One server with JetStream.
    pub fn single(dir: &Path) -> Nats {
        let (port, monitor) = (free_port(), free_port());
        let store = dir.join("nats");
        let server = Service::new("nats-server", dir, move || {
            let mut c = Command::new("nats-server");
            c.args(["-a", "127.0.0.1", "-p", &port.to_string(), "-m", &monitor.to_string(), "-js", "-sd"]);
            c.arg(&store);
            c
        });
        Nats { servers: vec![server], ports: vec![port], monitor_ports: vec![monitor] }
    }

    /// `n` servers forming one JetStream cluster; server `i` is named `n{i}`.
    pub fn cluster(dir: &Path, n: usize) -> anyhow::Result<Nats> {
        let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let monitor_ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let route_ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let routes = route_ports.iter().map(|p| format!("nats-route://127.0.0.1:{p}")).collect::<Vec<_>>().join(", ");
        let mut servers = Vec::with_capacity(n);
        for i in 0..n {
            let conf = dir.join(format!("nats-n{i}.conf"));
            let store = dir.join(format!("nats-n{i}"));
            std::fs::write(
                &conf,
                format!(
                    "server_name: n{i}\nlisten: 127.0.0.1:{}\nhttp: 127.0.0.1:{}\n\
                     jetstream {{ store_dir: \"{}\" }}\n\
                     cluster {{ name: chaos, listen: 127.0.0.1:{}, routes: [{routes}] }}\n",
                    ports[i],
                    monitor_ports[i],
                    store.display(),
                    route_ports[i],
                ),
            )
            .with_context(|| format!("writing {}", conf.display()))?;
            servers.push(Service::new(&format!("nats-n{i}"), dir, move || {
                let mut c = Command::new("nats-server");
                c.arg("-c").arg(&conf);
                c
            }));
        }
        Ok(Nats { servers, ports, monitor_ports })
    }

    /// `NATS_URL` for the runtime: every server, comma separated.
    pub fn url(&self) -> String {
        self.ports.iter().map(|p| format!("nats://127.0.0.1:{p}")).collect::<Vec<_>>().join(",")
    }

    pub fn start_all(&mut self) -> anyhow::Result<()> {
        for s in &mut self.servers {
            s.start()?;
        }
        for (p, s) in self.ports.iter().zip(&self.servers) {
            wait_port(*p, "nats-server", Duration::from_secs(10))
                .with_context(|| format!("{} wrote:\n{}", s.name, s.log_tail()))?;
        }
        Ok(())
    }

    /// Waits until server `i` reports itself healthy: listening, and with JetStream
    /// current (caught up with the cluster's meta leader and its streams).
    pub async fn wait_healthy(&self, i: usize, http: &reqwest::Client, timeout: Duration) -> anyhow::Result<()> {
        let url = format!("http://127.0.0.1:{}/healthz", self.monitor_ports[i]);
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(r) = http.get(&url).send().await {
                if r.status().is_success() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("nats server {i} not healthy after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until every server is healthy.
    pub async fn wait_all_healthy(&self, http: &reqwest::Client, timeout: Duration) -> anyhow::Result<()> {
        for i in 0..self.servers.len() {
            self.wait_healthy(i, http, timeout).await?;
        }
        Ok(())
    }
}

/// The index of the server leading `stream` (servers are named `n{i}`).
pub async fn stream_leader(js: &async_nats::jetstream::Context, stream: &str) -> anyhow::Result<usize> {
    let mut s = js.get_stream(stream).await.with_context(|| format!("stream {stream}"))?;
    let info = s.info().await.with_context(|| format!("info of stream {stream}"))?;
    let leader = info.cluster.as_ref().and_then(|c| c.leader.clone()).context("stream without a leader")?;
    leader.strip_prefix('n').and_then(|i| i.parse().ok()).with_context(|| format!("unknown server {leader}"))
}

/// The replicas a stream has (its leader and followers).
pub async fn stream_replicas(js: &async_nats::jetstream::Context, stream: &str) -> anyhow::Result<usize> {
    let mut s = js.get_stream(stream).await.with_context(|| format!("stream {stream}"))?;
    Ok(s.info().await?.config.num_replicas)
}
