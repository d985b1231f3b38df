//! Artifacts in a real S3-compatible server (moto), and the Postgres fallback.

use std::time::Duration;

use bloom::config::{S3Args, S3Settings};
use bloom::domain::Secret;
use reqwest::StatusCode;
use serde_json::json;

use crate::common::{s3_endpoint, wait_for, Opts, TestApp};

fn settings(endpoint: String, bucket: &str) -> S3Settings {
    S3Settings {
        endpoint: Some(endpoint),
        bucket: bucket.into(),
        region: "us-east-1".into(),
        path_style: true,
        static_credentials: Some((Secret::new("test"), Secret::new("test"))),
        timeout: Duration::from_secs(3),
    }
}

/// Outputs reported over NATS are written behind: stored in Postgres with the
/// completion (the task never waits for S3), then moved to S3 by the artifact mover.
#[tokio::test]
async fn artifacts_land_in_s3_and_stream_back_through_the_api() {
    let bucket = format!("bloom-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let app = TestApp::spawn_with(Opts { s3: Some(settings(s3_endpoint(), &bucket)), ..Opts::default() }).await;
    let (r, _) = app.start_reconciler().await;
    app.start_worker("w", 2).await;
    let id = app.submit("stored in s3").await["id"].as_str().unwrap().to_owned();
    wait_for("completed", Duration::from_secs(20), || async { app.status_of(&id).await == "completed" }).await;
    // The row points at S3 once its move commits; the pass counts it just after.
    wait_for("moved to S3", Duration::from_secs(20), || async {
        let (_, arts) = app.get(&format!("/api/runtime/artifacts?task_id={id}")).await;
        arts[0]["url"].is_string() && r.metrics.artifacts_moved_total.get() == 1
    })
    .await;
    assert_eq!(r.metrics.artifacts_written_behind_total.get(), 1);
    let (_, arts) = app.get(&format!("/api/runtime/artifacts?task_id={id}")).await;
    let art = &arts[0];
    let aid = art["id"].as_str().unwrap().to_owned();
    let key = format!("artifacts/{id}/{aid}.json");
    assert_eq!(art["url"], format!("s3://{bucket}/{key}"));
    assert_eq!(art["content"], json!(null));
    let aid = aid.as_str();
    let (status, one) = app.get(&format!("/api/runtime/artifacts/{aid}")).await;
    assert_eq!((status, one["id"].clone()), (StatusCode::OK, json!(aid)));
    let body = app.get_text(&format!("/api/runtime/artifacts/{aid}/content")).await;
    assert_eq!(body, "stored in s3");
    let (status, pre) = app.get(&format!("/api/runtime/artifacts/{aid}/content?presign=true")).await;
    assert_eq!(status, StatusCode::OK);
    let fetched = reqwest::get(pre["url"].as_str().unwrap()).await.unwrap().text().await.unwrap();
    assert_eq!(fetched, "stored in s3");
    // The object is really in the bucket.
    let conf = aws_sdk_s3::Config::builder()
        .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
        .endpoint_url(s3_endpoint())
        .region(aws_sdk_s3::config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_s3::config::Credentials::new("test", "test", None, None, "test"))
        .force_path_style(true)
        .build();
    let obj = aws_sdk_s3::Client::from_conf(conf)
        .get_object()
        .bucket(&bucket)
        .key(&key)
        .send()
        .await
        .expect("object in the bucket");
    let bytes = obj.body.collect().await.unwrap().into_bytes();
    assert_eq!(&bytes[..], b"stored in s3");
    let (status, _) = app.get("/api/runtime/artifacts/nope").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    app.stop().await;
}

/// An output over the write-behind size is uploaded before its task completes, under
/// the key of its lease: when the task reads `completed`, the artifact is in S3.
#[tokio::test]
async fn outputs_over_the_write_behind_size_are_uploaded_before_completion() {
    let bucket = format!("bloom-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let app = TestApp::spawn_with(Opts { s3: Some(settings(s3_endpoint(), &bucket)), ..Opts::default() }).await;
    let settings = bloom::reconciler::ReconcilerSettings {
        artifact_write_behind_max_bytes: 4,
        artifact_move_interval: Duration::from_secs(3600),
        ..app.reconciler_settings()
    };
    let (r, _) = app.start_reconciler_with(settings).await;
    app.start_worker("w", 1).await;
    let id = app.submit("longer than four bytes").await["id"].as_str().unwrap().to_owned();
    wait_for("completed", Duration::from_secs(20), || async { app.status_of(&id).await == "completed" }).await;
    let lease: String = sqlx::query_scalar("SELECT lease_id FROM llm_tasks WHERE id = $1")
        .bind(&id)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    let (_, arts) = app.get(&format!("/api/runtime/artifacts?task_id={id}")).await;
    assert_eq!(arts[0]["url"], format!("s3://{bucket}/artifacts/{id}/{lease}.json"));
    assert_eq!(arts[0]["content"], json!(null));
    assert_eq!(r.metrics.artifacts_written_behind_total.get(), 0);
    assert_eq!(r.metrics.artifacts_moved_total.get(), 0);
    app.stop().await;
}

#[tokio::test]
async fn large_outputs_are_uploaded_in_parts_and_streamed_back() {
    let bucket = format!("big-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let app = TestApp::spawn_with(Opts {
        s3: Some(settings(s3_endpoint(), &bucket)),
        body_limit: 32 * 1024 * 1024,
        ..Opts::default()
    })
    .await;
    app.register_worker("w", 1).await;
    let (id, _) = app.leased_task("big").await;
    // 20 MiB: three parts.
    let output: String = (0..20 * 1024 * 1024).map(|i| (b'a' + (i % 26) as u8) as char).collect();
    let (status, done) = app
        .post(
            &format!("/api/runtime/llm-tasks/{id}/complete"),
            json!({"status": "success", "output": output, "metrics": {"duration_ms": 1}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(done["artifact"]["url"].as_str().unwrap().starts_with("s3://"));
    let aid = done["artifact"]["id"].as_str().unwrap();
    let body = app
        .http
        .get(app.url(&format!("/api/runtime/artifacts/{aid}/content")))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(body.len(), output.len());
    assert!(body.as_ref() == output.as_bytes());
    app.stop().await;
}

#[tokio::test]
async fn artifacts_fall_back_to_postgres_when_s3_is_down() {
    // Nothing listens on port 9 of loopback.
    let app =
        TestApp::spawn_with(Opts { s3: Some(settings("http://127.0.0.1:9".into(), "down")), ..Opts::default() }).await;
    // Every output uploaded before completion (no write-behind): the upload fails.
    let settings =
        bloom::reconciler::ReconcilerSettings { artifact_write_behind_max_bytes: 0, ..app.reconciler_settings() };
    let (r, _) = app.start_reconciler_with(settings).await;
    // The worker waits for its result to be stored however long the failing upload takes
    // (its retries may outlast the default claim timeout, and the result would then be
    // sent again through the stream and uploaded a second time).
    let mut worker = app.worker_settings("w", 2);
    worker.claim_timeout = Duration::from_secs(60);
    app.start_worker_with(worker).await;
    let id = app.submit("kept in postgres").await["id"].as_str().unwrap().to_owned();
    wait_for("completed", Duration::from_secs(30), || async { app.status_of(&id).await == "completed" }).await;
    let (_, arts) = app.get(&format!("/api/runtime/artifacts?task_id={id}")).await;
    assert_eq!(arts[0]["url"], json!(null));
    assert_eq!(arts[0]["content"], "kept in postgres");
    // Counted once per storing: a result whose completion Postgres did not take in time
    // (a stall) comes again and falls back again.
    assert!(r.metrics.s3_fallbacks_total.get() >= 1);
    app.stop().await;
}

#[test]
fn seed_minio_variables_select_the_s3_store() {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        s3: S3Args,
    }
    let cli = Cli::try_parse_from([
        "x",
        "--minio-endpoint",
        "127.0.0.1",
        "--minio-port",
        "9311",
        "--minio-access-key",
        "a",
        "--minio-secret-key",
        "b",
        "--minio-use-ssl",
        "false",
    ])
    .unwrap();
    let s = cli.s3.settings().unwrap();
    assert_eq!(s.endpoint.as_deref(), Some("http://127.0.0.1:9311"));
    assert_eq!(s.bucket, "bloom-artifacts");
}

#[tokio::test]
async fn seed_minio_configuration_stores_artifacts() {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        s3: S3Args,
    }
    let port = s3_endpoint().rsplit(':').next().unwrap().to_owned();
    let bucket = format!("minio-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let cli = Cli::try_parse_from([
        "x",
        "--minio-endpoint",
        "127.0.0.1",
        "--minio-port",
        &port,
        "--minio-access-key",
        "a",
        "--minio-secret-key",
        "b",
        "--minio-artifact-bucket",
        &bucket,
    ])
    .unwrap();
    let app = TestApp::spawn_with(Opts { s3: cli.s3.settings(), ..Opts::default() }).await;
    app.register_worker("w", 1).await;
    let (id, _) = app.leased_task("minio").await;
    let (status, done) = app
        .post(
            &format!("/api/runtime/llm-tasks/{id}/complete"),
            json!({"status": "success", "output": "via minio vars", "metrics": {"duration_ms": 1}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{done}");
    assert!(done["artifact"]["url"].as_str().unwrap().starts_with(&format!("s3://{bucket}/artifacts/{id}/")));
    let aid = done["artifact"]["id"].as_str().unwrap();
    let body = app.get_text(&format!("/api/runtime/artifacts/{aid}/content")).await;
    assert_eq!(body, "via minio vars");
    app.stop().await;
}

/// Artifacts an S3 outage left in Postgres move to S3 once it is back: content readable
/// throughout, each moved exactly once by two concurrent movers, audited and counted.
#[tokio::test]
async fn artifacts_left_in_postgres_by_an_outage_move_to_s3_once_it_is_back() {
    use bloom::artifacts::ArtifactStore;
    use bloom::reconciler::artifact_moves::{self, MoveReport};

    // The API's S3 is down: completions keep their content in Postgres.
    let app =
        TestApp::spawn_with(Opts { s3: Some(settings("http://127.0.0.1:9".into(), "down")), ..Opts::default() }).await;
    app.register_worker("w", 8).await;
    let mut outputs = Vec::new();
    for i in 0..5 {
        let (id, _) = app.leased_task(&format!("task {i}")).await;
        let output = format!("output {i} ").repeat(1000 * (i + 1));
        let body = json!({"status": "success", "output": output, "metrics": {"duration_ms": 1}});
        let (status, done) = app.post(&format!("/api/runtime/llm-tasks/{id}/complete"), body).await;
        assert_eq!(status, StatusCode::OK, "{done}");
        assert_eq!(done["artifact"]["url"], json!(null));
        outputs.push((id, done["artifact"]["id"].as_str().unwrap().to_owned(), output));
    }
    let (_, stats) = app.get("/api/runtime/stats").await;
    assert_eq!(stats["artifacts"]["inline_backlog"], 5);

    // A mover whose S3 is still down moves nothing and loses nothing.
    let cancel = app.cancel.child_token();
    let down = app.reconciler_with(app.reconciler_settings(), &cancel).await;
    let report = artifact_moves::run_once(&down).await.unwrap();
    assert!(matches!(report, MoveReport { moved: 0, failed: 1..=5, backlog: 5 }), "{report:?}");
    for (_, aid, output) in &outputs {
        assert_eq!(&app.get_text(&format!("/api/runtime/artifacts/{aid}/content")).await, output);
    }

    // S3 is back: two movers share the backlog; every artifact moves once.
    let bucket = format!("moved-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let mut movers = Vec::new();
    for _ in 0..2 {
        let mut r = app.reconciler_with(app.reconciler_settings(), &cancel).await;
        r.artifacts = ArtifactStore::from_settings(Some(settings(s3_endpoint(), &bucket)), r.metrics.clone()).await;
        movers.push(r);
    }
    let (a, b) = tokio::join!(artifact_moves::run_once(&movers[0]), artifact_moves::run_once(&movers[1]));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!((a.moved + b.moved, a.failed + b.failed), (5, 0), "{a:?} {b:?}");
    assert_eq!(movers[0].metrics.artifacts_moved_total.get() + movers[1].metrics.artifacts_moved_total.get(), 5);
    assert_eq!(artifact_moves::run_once(&movers[0]).await.unwrap(), MoveReport::default());
    assert_eq!(movers[0].metrics.artifacts_inline_backlog.get(), 0);

    for (task, aid, output) in &outputs {
        let (_, art) = app.get(&format!("/api/runtime/artifacts/{aid}")).await;
        assert_eq!(art["url"], format!("s3://{bucket}/artifacts/{task}/{aid}.json"));
        assert_eq!(art["content"], json!(null));
        // The API reads it from the bucket now (its own S3 settings name another bucket:
        // the content route needs the bucket the URL names).
        let mover = &movers[0];
        let artifact = bloom::db::artifacts::get(&app.pool, &aid.as_str().into()).await.unwrap().unwrap();
        match mover.artifacts.content(&artifact).await.unwrap() {
            bloom::artifacts::Content::Stream(body) => {
                assert_eq!(&body.collect().await.unwrap().into_bytes()[..], output.as_bytes())
            }
            bloom::artifacts::Content::Inline(_) => panic!("still inline"),
        }
    }
    assert_eq!(app.count("SELECT count(*) FROM audit_logs WHERE action = 'artifact_moved'").await, 5);
    let (_, stats) = app.get("/api/runtime/stats").await;
    assert_eq!(stats["artifacts"]["inline_backlog"], 0);
    app.stop().await;
}
