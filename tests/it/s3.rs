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

#[tokio::test]
async fn artifacts_land_in_s3_and_stream_back_through_the_api() {
    let bucket = format!("bloom-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let app = TestApp::spawn_with(Opts { s3: Some(settings(s3_endpoint(), &bucket)), ..Opts::default() }).await;
    app.start_reconciler().await;
    app.start_worker("w", 2).await;
    let id = app.submit("stored in s3").await["id"].as_str().unwrap().to_owned();
    wait_for("completed", Duration::from_secs(20), || async { app.status_of(&id).await == "completed" }).await;
    let (_, arts) = app.get(&format!("/api/runtime/artifacts?task_id={id}")).await;
    let art = &arts[0];
    let lease: String = sqlx::query_scalar("SELECT lease_id FROM llm_tasks WHERE id = $1")
        .bind(&id)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(art["url"], format!("s3://{bucket}/artifacts/{id}/{lease}.json"));
    assert_eq!(art["content"], json!(null));
    let aid = art["id"].as_str().unwrap();
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
        .key(format!("artifacts/{id}/{lease}.json"))
        .send()
        .await
        .expect("object in the bucket");
    let bytes = obj.body.collect().await.unwrap().into_bytes();
    assert_eq!(&bytes[..], b"stored in s3");
    let (status, _) = app.get("/api/runtime/artifacts/nope").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
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
    let (r, _) = app.start_reconciler().await;
    app.start_worker("w", 2).await;
    let id = app.submit("kept in postgres").await["id"].as_str().unwrap().to_owned();
    wait_for("completed", Duration::from_secs(30), || async { app.status_of(&id).await == "completed" }).await;
    let (_, arts) = app.get(&format!("/api/runtime/artifacts?task_id={id}")).await;
    assert_eq!(arts[0]["url"], json!(null));
    assert_eq!(arts[0]["content"], "kept in postgres");
    assert_eq!(r.metrics.s3_fallbacks_total.get(), 1);
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
