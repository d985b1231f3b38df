//! The runtime's processes under test and their CPU time.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context};
use serde_json::{json, Value};

pub struct Proc {
    pub name: String,
    pub child: Child,
}

impl Proc {
    /// Peak resident memory in KiB.
    pub fn peak_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        status.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// CPU time (user + system, in clock ticks) of every process on the machine, by pid and
/// command name.
pub fn cpu_ticks() -> Vec<(u32, String, u64)> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| {
        let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // `pid (comm) state ppid ...`: comm may hold spaces, so split after the last ')'.
        let (head, rest) = stat.rsplit_once(')')?;
        let comm = head.split_once('(')?.1.to_owned();
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
        Some((pid, comm, ticks))
    })
    .collect()
}

/// The S3-compatible test server (moto), when the benchmark stores artifacts in S3.
const S3_SERVER: &str = "s3 server (moto, not in total)";

/// CPU milliseconds each component used between two [`cpu_ticks`] snapshots, per task.
pub fn cpu_ms_per_task(
    before: &[(u32, String, u64)],
    after: &[(u32, String, u64)],
    procs: &[&Proc],
    tasks: u64,
) -> Value {
    cpu_ms_per(before, after, procs, tasks.max(1) as f64)
}

/// CPU milliseconds each component used between two [`cpu_ticks`] snapshots, divided by
/// `divisor` (tasks, or seconds for the idle phase): the runtime's processes by label,
/// Postgres and nats-server by name.
pub fn cpu_ms_per(before: &[(u32, String, u64)], after: &[(u32, String, u64)], procs: &[&Proc], divisor: f64) -> Value {
    let tick_ms = 1000.0 / 100.0; // USER_HZ is 100 on Linux
    let component = |pid: u32, comm: &str| -> Option<String> {
        if let Some(p) = procs.iter().find(|p| p.child.id() == pid) {
            return Some(p.name.trim_end_matches(|c: char| c.is_ascii_digit() || c == '-').to_owned());
        }
        match comm {
            "postgres" => Some("postgres".into()),
            "nats-server" => Some("nats-server".into()),
            "bloom-bench" => Some("load generator".into()),
            "moto_server" => Some(S3_SERVER.into()),
            _ => None,
        }
    };
    let mut totals = std::collections::BTreeMap::<String, f64>::new();
    for (pid, comm, ticks) in after {
        let Some(name) = component(*pid, comm) else { continue };
        let start = before.iter().find(|(p, c, _)| p == pid && c == comm).map_or(0, |b| b.2);
        *totals.entry(name).or_default() += ticks.saturating_sub(start) as f64 * tick_ms / divisor;
    }
    // The S3 test server stands in for a remote service: shown, not in the total.
    let all: f64 = totals.iter().filter(|(k, _)| k.as_str() != S3_SERVER).map(|(_, v)| v).sum();
    totals.insert("total".into(), all);
    json!(totals)
}

fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.parent().context("binary directory")?.join(name);
    if !path.exists() {
        bail!("{} not found next to bloom-bench: build all binaries first", path.display());
    }
    Ok(path)
}

/// Starts a runtime binary; its warnings and errors go to `<temp dir>/bloom-bench/<label>.log`.
pub fn spawn(name: &str, label: &str, env: &[(&str, String)]) -> anyhow::Result<Proc> {
    let logs = std::env::temp_dir().join("bloom-bench");
    std::fs::create_dir_all(&logs)?;
    let log = std::fs::File::create(logs.join(format!("{label}.log")))?;
    let mut cmd = Command::new(sibling(name)?);
    cmd.stdout(Stdio::null()).stderr(log).env("RUST_LOG", "warn");
    for (k, v) in env {
        cmd.env(k, v);
    }
    Ok(Proc { name: label.to_owned(), child: cmd.spawn().with_context(|| format!("starting {name}"))? })
}
