//! `bloomctl up`: the whole runtime as child processes of bloomctl. The runtime lives
//! and dies as one: when any child exits, the others are stopped and bloomctl exits
//! non-zero; SIGINT, SIGTERM or SIGHUP stop every child; and on Linux each child gets
//! SIGTERM from the kernel when bloomctl itself dies, even by SIGKILL.

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use anyhow::Context;
use tokio::process::{Child, Command};
use tokio::signal::unix::{signal, SignalKind};

/// How long children get to stop after SIGTERM (a worker drains its tasks) before they
/// are killed.
const STOP_GRACE: Duration = Duration::from_secs(25);

/// What to run and on which ports.
pub struct Plan {
    pub reconcilers: usize,
    pub workers: usize,
    /// The first reconciler's HTTP port; the next ones count up by two. 0: none.
    pub reconciler_port: u16,
    /// The first worker's HTTP port; the next ones count up by two. 0: none.
    pub worker_port: u16,
}

/// The workers `bloomctl up` starts unless told: one that runs the executor's command
/// (the Claude CLI by default), none with the built-in test executor. That one answers
/// every prompt within milliseconds, so it would take each task before the clients that
/// lease (`POST /llm-tasks/:id/lease`) or dispatch (`/dispatch`) it themselves, and
/// before HTTP agents: it runs only when asked for (`--workers N`).
pub fn default_workers(executor: &str) -> usize {
    usize::from(executor != "builtin")
}

/// One running child.
struct Running {
    /// The binary and the setting a conflict would be about, e.g.
    /// `bloom-reconciler (BLOOM_RECONCILER_HTTP_PORT=9090)`.
    name: String,
    child: Child,
}

/// Starts the children and supervises them until a signal or the first exit.
pub async fn run(plan: &Plan) -> anyhow::Result<()> {
    let dir = std::env::current_exe()?.parent().context("binary directory")?.to_owned();
    let mut children = Vec::new();
    // Each start may fail (a binary missing): what started so far is stopped either way.
    let outcome = match start_all(&dir, plan, &mut children) {
        Ok(()) => supervise(&mut children).await,
        Err(e) => Err(e),
    };
    stop(&mut children).await;
    outcome
}

fn start_all(dir: &Path, plan: &Plan, children: &mut Vec<Running>) -> anyhow::Result<()> {
    for i in 0..plan.reconcilers {
        let port = nth_port(plan.reconciler_port, i);
        children.push(start(dir, "bloom-reconciler", &[("BLOOM_RECONCILER_HTTP_PORT", port.to_string())])?);
    }
    for i in 0..plan.workers {
        let port = nth_port(plan.worker_port, i);
        let env = [("BLOOM_WORKER_ID", format!("local-worker-{i}")), ("BLOOM_WORKER_HTTP_PORT", port.to_string())];
        children.push(start(dir, "bloom-worker", &env)?);
    }
    children.push(start(dir, "bloom-api", &[])?);
    eprintln!("bloomctl up: API on BLOOM_RUNTIME_PORT (default 3002); Ctrl-C stops everything");
    Ok(())
}

/// The port of the `i`-th instance: two apart, so reconciler and worker ports (9090 and
/// 9091 by default) interleave; 0 stays 0 (no HTTP server).
fn nth_port(first: u16, i: usize) -> u16 {
    if first == 0 {
        0
    } else {
        first.saturating_add((2 * i) as u16)
    }
}

fn start(dir: &Path, bin: &str, env: &[(&str, String)]) -> anyhow::Result<Running> {
    let path: PathBuf = dir.join(bin);
    let mut cmd = Command::new(&path);
    // A group of its own: a terminal's Ctrl-C reaches bloomctl only, which stops the
    // children in order instead of seeing them exit on their own.
    cmd.kill_on_drop(true).process_group(0).envs(env.iter().map(|(k, v)| (*k, v.as_str())));
    stop_with_parent(&mut cmd);
    let child = cmd.spawn().with_context(|| format!("starting {} (build all binaries first)", path.display()))?;
    let settings: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let name = if settings.is_empty() { bin.to_owned() } else { format!("{bin} ({})", settings.join(", ")) };
    Ok(Running { name, child })
}

/// Asks the kernel to send the child SIGTERM when its parent dies, whatever kills it.
#[cfg(target_os = "linux")]
fn stop_with_parent(cmd: &mut Command) {
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe
    // system calls.
    unsafe {
        cmd.pre_exec(|| {
            let parent = libc::getppid();
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent died before the request took effect: nobody would signal us.
            if libc::getppid() != parent {
                return Err(std::io::Error::other("bloomctl exited while starting its children"));
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn stop_with_parent(_cmd: &mut Command) {}

/// Waits for a stop signal (`Ok`) or for the first child to exit (`Err` naming it).
async fn supervise(children: &mut [Running]) -> anyhow::Result<()> {
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    tokio::select! {
        _ = int.recv() => Ok(()),
        _ = term.recv() => Ok(()),
        _ = hup.recv() => Ok(()),
        (name, status) = first_exit(children) => {
            anyhow::bail!("{name} exited ({}); stopped the others", describe(status))
        }
    }
}

async fn first_exit(children: &mut [Running]) -> (String, std::io::Result<ExitStatus>) {
    let waits = children.iter_mut().map(|r| Box::pin(async move { (r.name.clone(), r.child.wait().await) }));
    futures::future::select_all(waits).await.0
}

fn describe(status: std::io::Result<ExitStatus>) -> String {
    match status {
        Ok(s) => s.to_string(),
        Err(e) => format!("cannot wait for it: {e}"),
    }
}

/// SIGTERM to every child still running, then up to [`STOP_GRACE`] for all of them to
/// exit; those still running are killed.
async fn stop(children: &mut [Running]) {
    for r in children.iter() {
        if let Some(pid) = r.child.id() {
            // SAFETY: `pid` is our child, not yet reaped (tokio keeps the id until then).
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGTERM);
            }
        }
    }
    let all = futures::future::join_all(children.iter_mut().map(|r| r.child.wait()));
    if tokio::time::timeout(STOP_GRACE, all).await.is_err() {
        for r in children.iter_mut().filter(|r| r.child.id().is_some()) {
            eprintln!("bloomctl up: {} did not stop within {}s; killing it", r.name, STOP_GRACE.as_secs());
            let _ = r.child.start_kill();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_count_up_by_two_and_zero_disables() {
        assert_eq!([nth_port(9090, 0), nth_port(9090, 1), nth_port(9091, 1)], [9090, 9092, 9093]);
        assert_eq!(nth_port(0, 3), 0);
    }

    #[test]
    fn a_worker_by_default_only_for_a_command_executor() {
        assert_eq!(default_workers("command"), 1);
        assert_eq!(default_workers("builtin"), 0);
    }
}
