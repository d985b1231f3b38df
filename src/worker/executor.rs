//! Runs one task: a configured command (by default the Claude CLI in print mode) or the
//! built-in test executor.
//!
//! The command runs as `sh -c <command>` in its own process group, with the prompt on
//! stdin and the task in environment variables:
//!
//! | variable | value |
//! |---|---|
//! | `BLOOM_TASK_ID` | task id |
//! | `BLOOM_CONTEXT_ID` | `context_id` |
//! | `BLOOM_AGENT_SLUG` | `agent_slug` |
//! | `BLOOM_DESIRED_FORMAT` | `json` or `text` |
//! | `BLOOM_CONTEXT_HINTS` | `context_hints` as a JSON array |
//! | `BLOOM_TIMEOUT_SEC` | `policy.timeout_sec` |
//! | `BLOOM_BUDGET` | `policy.budget` |
//! | `BLOOM_MAX_BUDGET_USD` | `policy.budget`, only when above 0 (the default command passes it to `--max-budget-usd`) |
//! | `BLOOM_ATTEMPT` | attempt number (1-based) |
//!
//! stdout is the output (at most `max_output_bytes`); a non-zero exit, a timeout (the
//! whole process group is killed, class `timeout`) or an oversized output is an error
//! result. When stdout is the Claude CLI's output (its `json` envelope or `stream-json`
//! lines, see [`super::cli_output`]), the output is its `result`, the metrics carry what
//! the run used and cost, and a failed run has its class; output that `desired_format`
//! `json` cannot parse is an error of class `invalid_output`.
//!
//! `policy.budget` (USD, when above 0) is a hard cap: it is passed to the command, and a
//! run whose output reports a cost above it (a `stream-json` line with `total_cost_usd`,
//! read as the run goes) is killed at once; a run that ends reporting more than its
//! budget fails too. Either is an error of class `max_budget` with the cost reported.

use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::cli_output;
use crate::domain::{DesiredFormat, ErrorKind, Metrics, Outcome, ResultStatus, Usage};
use crate::protocol::TaskMessage;

pub use crate::config::DEFAULT_EXECUTOR_COMMAND as DEFAULT_COMMAND;

/// What executes tasks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Executor {
    /// A shell command.
    Command { command: String, max_output_bytes: usize },
    /// The built-in test executor, driven by the prompt: `sleep:<ms>` sleeps then
    /// echoes, `fail[:<message>]` fails, `crash` aborts the worker process, anything
    /// else is echoed back as the output.
    Builtin,
}

/// Metrics of a run that took since `started` and used `usage`.
fn metrics(started: Instant, usage: Usage) -> Metrics {
    Metrics { duration_ms: started.elapsed().as_millis() as i64, tokens_used: usage.tokens(), usage }
}

/// A success that took since `started`.
fn success(output: String, started: Instant) -> Outcome {
    Outcome::success(output, metrics(started, Usage::default()))
}

/// A failure of `kind` that took since `started`.
fn failure(kind: ErrorKind, message: impl Into<String>, output: Option<String>, started: Instant) -> Outcome {
    Outcome::error(message, output, metrics(started, Usage::default())).kind(kind)
}

/// A timeout after `timeout`.
fn timed_out(timeout: Duration, started: Instant) -> Outcome {
    failure(ErrorKind::Timeout, format!("timed out after {}s", timeout.as_secs()), None, started)
}

impl Executor {
    /// Runs `task`. Returns `None` when `cancel` fired first (the task is handed back).
    pub async fn run(&self, task: &TaskMessage, cancel: &CancellationToken) -> Option<Outcome> {
        let started = Instant::now();
        let timeout = Duration::from_secs(task.policy.timeout_sec.clamp(1, 3600) as u64);
        let outcome = match self {
            Executor::Builtin => tokio::select! {
                _ = cancel.cancelled() => return None,
                r = tokio::time::timeout(timeout, builtin(task, started)) => r.unwrap_or_else(|_| timed_out(timeout, started)),
            },
            Executor::Command { command, max_output_bytes } => {
                run_command(command, *max_output_bytes, task, timeout, cancel, started).await?
            }
        };
        Some(check_format(outcome, task.desired_format, started))
    }
}

async fn builtin(task: &TaskMessage, started: Instant) -> Outcome {
    let prompt = task.prompt.trim();
    if let Some(ms) = prompt.strip_prefix("sleep:") {
        let ms: u64 = ms.trim().parse().unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        return success(format!("slept {ms}ms"), started);
    }
    if prompt == "fail" || prompt.starts_with("fail:") {
        let msg = prompt.strip_prefix("fail:").unwrap_or("builtin executor asked to fail").trim();
        return failure(ErrorKind::Execution, msg, None, started);
    }
    if prompt == "crash" {
        tracing::error!(task.id = %task.task_id, "builtin executor asked to crash: aborting the worker process");
        std::process::abort();
    }
    // Echoed as a command's stdout: a prompt that is the Claude CLI's output (usage,
    // cost, a rate limit) is read as the CLI's run would be.
    parse_stdout(task.prompt.clone(), task.policy.budget, started)
}

fn check_format(outcome: Outcome, format: DesiredFormat, started: Instant) -> Outcome {
    if outcome.status == ResultStatus::Success && format == DesiredFormat::Json {
        let out = outcome.output.as_deref().unwrap_or("");
        if let Err(e) = serde_json::from_str::<serde_json::Value>(out) {
            let message = format!("output is not valid JSON (desired_format json): {e}");
            let mut invalid = Outcome::error(message, outcome.output, outcome.metrics).kind(ErrorKind::InvalidOutput);
            invalid.metrics.duration_ms = started.elapsed().as_millis() as i64;
            return invalid;
        }
    }
    outcome
}

/// Reads at most `limit` bytes; `Err(())` when there was more. With `watch` (a budget
/// above 0 and where to say it was passed), each complete line is read for the cost the
/// run reports so far, and the first above the budget is sent.
async fn read_bounded(
    mut r: impl AsyncReadExt + Unpin,
    limit: usize,
    mut watch: Option<(f64, oneshot::Sender<f64>)>,
) -> Result<Vec<u8>, ()> {
    let mut buf = Vec::new();
    let mut scanned = 0;
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match r.read(&mut chunk).await {
            Ok(0) | Err(_) => return Ok(buf),
            Ok(n) => {
                if buf.len() + n > limit {
                    return Err(());
                }
                buf.extend_from_slice(&chunk[..n]);
                while let Some((budget, _)) = &watch {
                    let Some(end) = buf[scanned..].iter().position(|&b| b == b'\n') else { break };
                    let cost = cli_output::cost_so_far(&buf[scanned..scanned + end]);
                    scanned += end + 1;
                    if let Some(cost) = cost.filter(|c| c > budget) {
                        if let Some((_, over)) = watch.take() {
                            let _ = over.send(cost);
                        }
                    }
                }
            }
        }
    }
}

/// A run stopped, or failed, for costing `cost` over its `budget`.
fn over_budget(cost: f64, budget: f64, output: Option<String>, mut metrics: Metrics) -> Outcome {
    metrics.usage.total_cost_usd = Some(cost);
    let message = format!("the run cost ${cost}, above its budget of ${budget} (policy.budget)");
    Outcome::error(message, output, metrics).kind(ErrorKind::MaxBudget)
}

/// Kills the process group when dropped.
struct GroupGuard(Option<u32>);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        kill_group(self.0);
    }
}

fn kill_group(pid: Option<u32>) {
    if let Some(pid) = pid {
        // SAFETY: kill(2) with a negative pid signals the process group we created.
        unsafe {
            libc::kill(-(pid as i32), libc::SIGKILL);
        }
    }
}

async fn run_command(
    command: &str,
    max_output: usize,
    task: &TaskMessage,
    timeout: Duration,
    cancel: &CancellationToken,
    started: Instant,
) -> Option<Outcome> {
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(command)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .env("BLOOM_TASK_ID", task.task_id.as_str())
        .env("BLOOM_CONTEXT_ID", &task.context_id)
        .env("BLOOM_AGENT_SLUG", &task.agent_slug)
        .env("BLOOM_DESIRED_FORMAT", task.desired_format.as_str())
        .env("BLOOM_CONTEXT_HINTS", serde_json::to_string(&task.context_hints).unwrap_or_default())
        .env("BLOOM_TIMEOUT_SEC", task.policy.timeout_sec.to_string())
        .env("BLOOM_BUDGET", task.policy.budget.to_string())
        .env(
            "BLOOM_MAX_BUDGET_USD",
            if task.policy.budget > 0.0 { task.policy.budget.to_string() } else { String::new() },
        )
        .env("BLOOM_ATTEMPT", (task.attempts + 1).to_string());
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return Some(failure(ErrorKind::Execution, format!("could not start executor: {e}"), None, started)),
    };
    let pid = child.id();
    // Whatever ends this future, dropped included (a cancelled task, a lost lease), takes
    // the whole group with it: `kill_on_drop` alone reaches only the shell.
    let _group = GroupGuard(pid);
    let mut stdin = child.stdin.take();
    let prompt = task.prompt.clone();
    let feed = async move {
        if let Some(stdin) = stdin.as_mut() {
            let _ = stdin.write_all(prompt.as_bytes()).await;
            let _ = stdin.shutdown().await;
        }
    };
    let stdout = child.stdout.take().expect("stdout piped");
    let stderr = child.stderr.take().expect("stderr piped");
    let budget = task.policy.budget;
    let (over_tx, over_rx) = oneshot::channel();
    let watch = (budget > 0.0).then_some((budget, over_tx));
    let work = async {
        let (_, out, err, status) = tokio::join!(
            feed,
            read_bounded(stdout, max_output, watch),
            read_bounded(stderr, 64 * 1024, None),
            child.wait()
        );
        (out, err, status)
    };
    let (out, err, status) = tokio::select! {
        // Reported above its budget while running: stopped now (a closed channel, the
        // output read to its end without that, disables this branch).
        Ok(cost) = over_rx => {
            kill_group(pid);
            return Some(over_budget(cost, budget, None, metrics(started, Usage::default())));
        }
        r = tokio::time::timeout(timeout, work) => match r {
            Ok(r) => r,
            Err(_) => {
                kill_group(pid);
                return Some(timed_out(timeout, started));
            }
        },
        _ = cancel.cancelled() => {
            kill_group(pid);
            return None;
        }
    };
    // Children the command left behind in its group.
    kill_group(pid);
    let Ok(out) = out else {
        return Some(failure(ErrorKind::Execution, format!("output exceeded {max_output} bytes"), None, started));
    };
    let stdout = String::from_utf8_lossy(&out).into_owned();
    let stderr_tail = err.map(|e| String::from_utf8_lossy(&e).trim().to_owned()).unwrap_or_default();
    match status {
        Ok(s) if s.success() => Some(parse_stdout(stdout, budget, started)),
        Ok(s) => {
            // The CLI exits non-zero after a failed run: its own report says more.
            if let Some(report) = cli_output::parse(&stdout).filter(|r| r.failure.is_some()) {
                return Some(from_report(report, stdout, budget, started));
            }
            let code = s.code().map_or_else(|| "a signal".to_owned(), |c| format!("code {c}"));
            let msg = if stderr_tail.is_empty() {
                format!("executor exited with {code}")
            } else {
                format!("executor exited with {code}: {stderr_tail}")
            };
            Some(failure(ErrorKind::Execution, msg, Some(stdout), started))
        }
        Err(e) => Some(failure(ErrorKind::Execution, format!("waiting for executor failed: {e}"), None, started)),
    }
}

/// Reads stdout as the Claude CLI's output when it is that, as plain output otherwise.
fn parse_stdout(stdout: String, budget: f64, started: Instant) -> Outcome {
    match cli_output::parse(&stdout) {
        Some(report) => from_report(report, stdout, budget, started),
        None => success(stdout, started),
    }
}

/// The outcome the CLI's `report` describes (`stdout` is the output when it has no text);
/// a success that cost more than a `budget` above 0 is a `max_budget` failure.
fn from_report(report: cli_output::Report, stdout: String, budget: f64, started: Instant) -> Outcome {
    let metrics = metrics(started, report.usage);
    let cost = metrics.usage.total_cost_usd.unwrap_or(0.0);
    let mut outcome = match report.failure {
        None if budget > 0.0 && cost > budget => over_budget(cost, budget, report.output, metrics),
        None => Outcome::success(report.output.unwrap_or(stdout), metrics),
        Some((kind, message)) => Outcome::error(message, report.output, metrics).kind(kind),
    };
    outcome.retry_at = report.retry_at;
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Policy;

    fn task(prompt: &str, format: DesiredFormat, timeout_sec: i64) -> TaskMessage {
        TaskMessage {
            task_id: "t1".into(),
            dispatch_seq: 1,
            context_id: "ctx".into(),
            agent_slug: "agent".into(),
            prompt: prompt.into(),
            context_hints: vec!["h1".into()],
            policy: Policy { timeout_sec, budget: 0.0, retry: None },
            desired_format: format,
            attempts: 0,
            max_attempts: 3,
            created_at: 0,
        }
    }

    fn cmd(c: &str) -> Executor {
        Executor::Command { command: c.into(), max_output_bytes: 1024 }
    }

    #[tokio::test]
    async fn command_gets_prompt_on_stdin_and_task_in_env() {
        let out = cmd("printf '%s|%s|%s' \"$(cat)\" \"$BLOOM_AGENT_SLUG\" \"$BLOOM_CONTEXT_HINTS\"")
            .run(&task("hello", DesiredFormat::Text, 10), &CancellationToken::new())
            .await
            .unwrap();
        assert_eq!(out.status, ResultStatus::Success, "{out:?}");
        assert_eq!(out.output.as_deref(), Some("hello|agent|[\"h1\"]"));
    }

    #[tokio::test]
    async fn non_zero_exit_is_an_error_with_stderr() {
        let out = cmd("echo boom >&2; exit 3")
            .run(&task("x", DesiredFormat::Text, 10), &CancellationToken::new())
            .await
            .unwrap();
        assert_eq!(out.status, ResultStatus::Error);
        assert_eq!(out.error_message.as_deref(), Some("executor exited with code 3: boom"));
    }

    #[tokio::test]
    async fn timeout_kills_the_process_group() {
        let start = Instant::now();
        let out = cmd("sleep 30 & sleep 30; echo never")
            .run(&task("x", DesiredFormat::Text, 1), &CancellationToken::new())
            .await
            .unwrap();
        assert_eq!(out.error_message.as_deref(), Some("timed out after 1s"));
        assert!(start.elapsed() < Duration::from_secs(10));
    }

    #[tokio::test]
    async fn oversized_output_is_an_error() {
        let out = cmd("head -c 5000 /dev/zero")
            .run(&task("x", DesiredFormat::Text, 10), &CancellationToken::new())
            .await
            .unwrap();
        assert_eq!(out.error_message.as_deref(), Some("output exceeded 1024 bytes"));
    }

    #[tokio::test]
    async fn json_format_is_validated_and_claude_envelope_unwrapped() {
        let bad =
            cmd("echo not-json").run(&task("x", DesiredFormat::Json, 10), &CancellationToken::new()).await.unwrap();
        assert_eq!(bad.status, ResultStatus::Error);
        let envelope = r#"{"type":"result","result":"{\"a\":1}","usage":{"input_tokens":5,"output_tokens":7}}"#;
        let good = cmd(&format!("echo '{envelope}'"))
            .run(&task("x", DesiredFormat::Json, 10), &CancellationToken::new())
            .await
            .unwrap();
        assert_eq!(good.status, ResultStatus::Success, "{good:?}");
        assert_eq!(good.output.as_deref(), Some("{\"a\":1}"));
        assert_eq!(good.metrics.tokens_used, Some(12));
    }

    #[tokio::test]
    async fn a_run_reporting_a_cost_above_its_budget_is_killed_at_once() {
        let mut t = task("x", DesiredFormat::Text, 30);
        t.policy.budget = 0.5;
        let start = Instant::now();
        let script = r#"echo '{"type":"assistant","total_cost_usd":0.2}'; echo '{"type":"assistant","total_cost_usd":0.75}'; sleep 30; echo never"#;
        let out = cmd(script).run(&t, &CancellationToken::new()).await.unwrap();
        assert_eq!(out.error_kind, Some(ErrorKind::MaxBudget), "{out:?}");
        assert_eq!(out.metrics.usage.total_cost_usd, Some(0.75));
        assert!(out.error_message.as_deref().unwrap().contains("above its budget of $0.5"), "{out:?}");
        assert!(start.elapsed() < Duration::from_secs(10), "killed, not waited for");
        // Under the budget: the run goes on to its result.
        let fine = cmd(r#"echo '{"type":"assistant","total_cost_usd":0.2}'; echo '{"type":"result","subtype":"success","result":"ok","total_cost_usd":0.4}'"#)
            .run(&t, &CancellationToken::new())
            .await
            .unwrap();
        assert_eq!((fine.status, fine.output.as_deref()), (ResultStatus::Success, Some("ok")), "{fine:?}");
        // A result above the budget, at the end: a failure that keeps its output.
        let late = cmd(r#"echo '{"type":"result","subtype":"success","result":"late","total_cost_usd":0.9}'"#)
            .run(&t, &CancellationToken::new())
            .await
            .unwrap();
        assert_eq!((late.error_kind, late.output.as_deref()), (Some(ErrorKind::MaxBudget), Some("late")), "{late:?}");
    }

    #[tokio::test]
    async fn builtin_echoes_sleeps_and_fails() {
        let c = CancellationToken::new();
        let echo = Executor::Builtin.run(&task("hi", DesiredFormat::Text, 10), &c).await.unwrap();
        assert_eq!(echo.output.as_deref(), Some("hi"));
        let fail = Executor::Builtin.run(&task("fail: nope", DesiredFormat::Text, 10), &c).await.unwrap();
        assert_eq!(fail.error_message.as_deref(), Some("nope"));
        let slow = Executor::Builtin.run(&task("sleep:3000", DesiredFormat::Text, 1), &c).await.unwrap();
        assert_eq!(slow.error_message.as_deref(), Some("timed out after 1s"));
        c.cancel();
        assert!(Executor::Builtin.run(&task("sleep:3000", DesiredFormat::Text, 10), &c).await.is_none());
    }
}
