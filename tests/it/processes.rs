//! The binaries as processes: a port in use is named with the setting to change, and
//! `bloomctl up` keeps its children's lives tied to its own.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{fresh_db, nats_url};

#[test]
fn a_port_in_use_names_the_address_and_the_setting_to_change() {
    let taken = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let cases = [
        (env!("CARGO_BIN_EXE_bloom-api"), "BLOOM_RUNTIME_PORT"),
        (env!("CARGO_BIN_EXE_bloom-reconciler"), "BLOOM_RECONCILER_HTTP_PORT"),
        (env!("CARGO_BIN_EXE_bloom-worker"), "BLOOM_WORKER_HTTP_PORT"),
    ];
    for (bin, variable) in cases {
        let out = Command::new(bin)
            .env(variable, &port)
            .env("BLOOM_RUNTIME_HOST", "0.0.0.0")
            // Unreachable: the port must be refused before anything is connected.
            .env("DATABASE_URL", "postgres://postgres@127.0.0.1:1/none")
            .env("NATS_URL", "nats://127.0.0.1:1")
            .env_remove("RUST_LOG")
            .output()
            .expect("run binary");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{bin}: {err}");
        assert!(err.contains(&format!("cannot listen on 0.0.0.0:{port}")), "{bin}: {err}");
        assert!(err.contains(variable) && err.to_lowercase().contains("address already in use"), "{bin}: {err}");
        assert!(!err.contains('\x1b'), "{bin}: no colour codes when stderr is not a terminal: {err:?}");
    }
}

/// A running `bloomctl up`: one reconciler and one worker without HTTP ports, the API on
/// a free port; every process it starts carries `BLOOM_TEST_MARK` in its environment.
struct Up {
    child: Child,
    mark: String,
    api: String,
    stderr: std::path::PathBuf,
}

impl Up {
    async fn start() -> Up {
        Up::start_with(&["--workers", "1"], &[]).await
    }

    /// `bloomctl up --reconcilers 1` with these further arguments and variables.
    async fn start_with(args: &[&str], vars: &[(&str, &str)]) -> Up {
        let (_, db_url) = fresh_db().await;
        let mark = uuid::Uuid::new_v4().simple().to_string();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let stderr = std::env::temp_dir().join(format!("bloomctl-up-{mark}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_bloomctl"))
            .args(["up", "--reconcilers", "1"])
            .args(args)
            .envs(vars.iter().copied())
            .env("BLOOM_RECONCILER_HTTP_PORT", "0")
            .env("BLOOM_WORKER_HTTP_PORT", "0")
            .env("DATABASE_URL", &db_url)
            .env("NATS_URL", nats_url())
            .env("BLOOM_NATS_NAMESPACE", format!("u{}", &mark[..12]))
            .env("BLOOM_RUNTIME_HOST", "127.0.0.1")
            .env("BLOOM_RUNTIME_PORT", port.to_string())
            .env("BLOOM_EXECUTOR", "builtin")
            .env("BLOOM_WORKER_SHUTDOWN_GRACE_SECS", "1")
            .env("BLOOM_TEST_MARK", &mark)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("run bloomctl up");
        let up = Up { child, mark, api: format!("http://127.0.0.1:{port}"), stderr };
        up.wait_until_serving().await;
        up
    }

    async fn wait_until_serving(&self) {
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while !http.get(format!("{}/healthz", self.api)).send().await.is_ok_and(|r| r.status().is_success()) {
            assert!(Instant::now() < deadline, "the API did not start: {}", self.stderr());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// The live processes it started (bloomctl itself included), by pid and name.
    fn processes(&self) -> Vec<(i32, String)> {
        let needle = format!("BLOOM_TEST_MARK={}", self.mark);
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
            // Unreadable once the process is gone or a zombie.
            let environ = std::fs::read(entry.path().join("environ")).unwrap_or_default();
            if environ.split(|b| *b == 0).any(|var| var == needle.as_bytes()) {
                let name = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
                found.push((pid, name.trim().to_owned()));
            }
        }
        found
    }

    /// Waits until no process it started is left.
    async fn wait_until_all_gone(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let left = self.processes();
            if left.is_empty() {
                return;
            }
            assert!(Instant::now() < deadline, "still running: {left:?}\n{}", self.stderr());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn wait_for_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "bloomctl up still running: {}", self.stderr());
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        for (pid, _) in self.processes() {
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let _ = std::fs::remove_file(&self.stderr);
    }
}

#[tokio::test]
async fn up_stops_everything_and_fails_when_a_child_dies() {
    let mut up = Up::start().await;
    let running = up.processes();
    let names: Vec<&str> = running.iter().map(|(_, n)| n.as_str()).collect();
    for bin in ["bloomctl", "bloom-api", "bloom-reconcil", "bloom-worker"] {
        assert!(names.iter().any(|n| n.starts_with(bin)), "{bin} in {names:?}");
    }
    let (worker, _) = running.iter().find(|(_, n)| n == "bloom-worker").unwrap();
    unsafe { libc::kill(*worker, libc::SIGKILL) };
    let status = up.wait_for_exit(Duration::from_secs(40));
    assert_eq!(status.code(), Some(1), "{}", up.stderr());
    let err = up.stderr();
    assert!(err.contains("bloom-worker") && err.contains("exited (signal: 9"), "{err}");
    up.wait_until_all_gone(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn killing_up_stops_its_children() {
    let mut up = Up::start().await;
    assert_eq!(up.processes().len(), 4, "{:?}", up.processes());
    up.child.kill().unwrap();
    up.child.wait().unwrap();
    up.wait_until_all_gone(Duration::from_secs(30)).await;
}

/// With the built-in test executor (as `scripts/run-local.sh` runs by default) and no
/// number of workers asked for, `bloomctl up` starts no worker: a task waits for a
/// client that leases it over REST, as the original service's clients do, and nothing
/// claims it first.
#[tokio::test]
async fn up_with_the_test_executor_leaves_tasks_to_the_clients_that_lease_them() {
    let up = Up::start_with(&[], &[]).await;
    let names: Vec<String> = up.processes().into_iter().map(|(_, n)| n).collect();
    assert_eq!(names.len(), 3, "bloomctl, the API and one reconciler: {names:?}");
    assert!(!names.iter().any(|n| n.starts_with("bloom-worker")), "{names:?}");
    let http = reqwest::Client::new();
    let post = |path: &str, body: serde_json::Value| http.post(format!("{}{path}", up.api)).json(&body).send();
    let worker = post("/api/runtime/workers", serde_json::json!({"name": "client", "capabilities": {}})).await.unwrap();
    assert!(worker.status().is_success());
    let task: serde_json::Value = post(
        "/api/runtime/llm-tasks",
        serde_json::json!({"context_id": "c1", "agent_slug": "writer", "prompt": "hello"}),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let id = task["id"].as_str().unwrap();
    let leased = post(&format!("/api/runtime/llm-tasks/{id}/lease"), serde_json::json!({})).await.unwrap();
    assert_eq!(leased.status(), reqwest::StatusCode::CREATED);
    let lease: serde_json::Value = leased.json().await.unwrap();
    assert_eq!(lease["lease"]["worker_id"], "client", "{lease}");
}
