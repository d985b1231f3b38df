//! `bloomctl` against a running installation: submit and wait, list, show, exit codes.

use std::process::Command;

use crate::common::TestApp;

fn bloomctl(app: &TestApp, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_bloomctl"))
        .args(args)
        .env("BLOOM_API_URL", &app.base)
        .env_remove("RUNTIME_API_KEY")
        .output()
        .expect("run bloomctl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[tokio::test]
async fn submit_wait_list_show_and_exit_codes() {
    let app = TestApp::spawn().await;
    app.start_reconciler().await;
    app.start_worker("w", 4).await;
    let a = app.clone_handle();
    let (code, out, err) =
        tokio::task::spawn_blocking(move || bloomctl(&a, &["submit", "hello from bloomctl", "--wait"])).await.unwrap();
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "hello from bloomctl");
    let a = app.clone_handle();
    let (code, out, _) = tokio::task::spawn_blocking(move || {
        bloomctl(&a, &["submit", "fail: nope", "--wait", "--count", "2", "--json"])
    })
    .await
    .unwrap();
    assert_eq!(code, 5, "a failed task exits 5");
    let results: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(results.as_array().unwrap().len(), 2);
    assert_eq!(results[0]["status"], "failed");

    let a = app.clone_handle();
    let (code, out, _) = tokio::task::spawn_blocking(move || bloomctl(&a, &["tasks", "list", "--json"])).await.unwrap();
    assert_eq!(code, 0);
    assert_eq!(serde_json::from_str::<serde_json::Value>(&out).unwrap().as_array().unwrap().len(), 3);
    let a = app.clone_handle();
    let (code, out, _) =
        tokio::task::spawn_blocking(move || bloomctl(&a, &["tasks", "list", "--status", "completed"])).await.unwrap();
    assert_eq!(code, 0);
    assert!(out.starts_with("ID"), "{out}");
    assert_eq!(out.lines().count(), 2, "{out}");
    let a = app.clone_handle();
    let (code, _, err) =
        tokio::task::spawn_blocking(move || bloomctl(&a, &["tasks", "show", "missing"])).await.unwrap();
    assert_eq!(code, 3, "{err}");
    let a = app.clone_handle();
    let (code, _, _) =
        tokio::task::spawn_blocking(move || bloomctl(&a, &["tasks", "requeue", "missing"])).await.unwrap();
    assert_eq!(code, 3);
    let a = app.clone_handle();
    let (code, out, _) = tokio::task::spawn_blocking(move || bloomctl(&a, &["stats"])).await.unwrap();
    assert_eq!(code, 0);
    assert!(out.contains("tasks    total 3"), "{out}");
    app.stop().await;
}

#[tokio::test]
async fn nats_delete_removes_the_namespace_streams_only_when_confirmed() {
    let app = TestApp::spawn().await;
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_bloomctl"))
            .args(args)
            .env("NATS_URL", crate::common::nats_url())
            .env("BLOOM_NATS_NAMESPACE", app.names.namespace())
            .output()
            .expect("run bloomctl");
        (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let js = async_nats::jetstream::new(app.nats.clone());
    let streams = [app.names.tasks_stream(), app.names.results_stream()];
    let (code, _) = run(&["nats", "delete"]);
    assert_eq!(code, 2, "refused without --yes");
    for s in &streams {
        assert!(js.get_stream(s).await.is_ok(), "{s} still there");
    }
    let (code, out) = run(&["nats", "delete", "--yes"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&streams[0]) && out.contains(&streams[1]), "{out}");
    for s in &streams {
        assert!(js.get_stream(s).await.is_err(), "{s} deleted");
    }
    let (code, out) = run(&["nats", "delete", "--yes"]);
    assert_eq!((code, out.trim()), (0, "streams deleted: none"), "deleting again is a no-op");
    app.stop().await;
}
