//! One task is one trace across processes: the API, a worker and a reconciler run as
//! real processes exporting over OTLP/HTTP to a receiver in this test; their spans share
//! the task's trace id. The Prometheus metrics of the processes move as the task runs.

use std::collections::{HashMap, HashSet};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;

use crate::common::{free_port, fresh_db, nats_url, wait_for, Kill};

/// (service.name, trace id, span name) of every exported span.
type Spans = Arc<Mutex<Vec<(String, Vec<u8>, String)>>>;

async fn receiver() -> (String, Spans) {
    let spans: Spans = Arc::default();
    let sink = spans.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        post(move |body: Bytes| {
            let sink = sink.clone();
            async move {
                let req = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
                let mut out = sink.lock().unwrap();
                for rs in req.resource_spans {
                    let service = rs
                        .resource
                        .iter()
                        .flat_map(|r| r.attributes.iter())
                        .find(|a| a.key == "service.name")
                        .and_then(|a| a.value.as_ref())
                        .and_then(|v| match &v.value {
                            Some(opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(s)) => {
                                Some(s.clone())
                            }
                            _ => None,
                        })
                        .unwrap_or_default();
                    for ss in rs.scope_spans {
                        for span in ss.spans {
                            out.push((service.clone(), span.trace_id, span.name));
                        }
                    }
                }
                ""
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, spans)
}

#[tokio::test]
async fn one_task_is_one_trace_across_api_worker_and_reconciler() {
    let (otlp, spans) = receiver().await;
    let (pool, db_url) = fresh_db().await;
    let ns = format!("tr{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let (api_port, rec_port, worker_port) = (free_port(), free_port(), free_port());
    let env = [
        ("DATABASE_URL", db_url.clone()),
        ("NATS_URL", nats_url()),
        ("BLOOM_NATS_NAMESPACE", ns.clone()),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.clone()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100".into()),
        ("RUST_LOG", "warn".into()),
        ("BLOOM_RUNTIME_HOST", "127.0.0.1".into()),
        ("BLOOM_RUNTIME_PORT", api_port.to_string()),
        ("BLOOM_RECONCILER_HTTP_PORT", rec_port.to_string()),
        ("BLOOM_WORKER_HTTP_PORT", worker_port.to_string()),
        ("BLOOM_EXECUTOR", "builtin".into()),
        ("BLOOM_WORKER_ID", "traced-worker".into()),
    ];
    let spawn = |bin: &str| {
        Kill(Command::new(bin).envs(env.iter().map(|(k, v)| (*k, v.as_str()))).stdout(Stdio::null()).spawn().unwrap())
    };
    let _procs = [
        spawn(env!("CARGO_BIN_EXE_bloom-api")),
        spawn(env!("CARGO_BIN_EXE_bloom-reconciler")),
        spawn(env!("CARGO_BIN_EXE_bloom-worker")),
    ];
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{api_port}");
    wait_for("API ready", Duration::from_secs(30), || async {
        http.get(format!("{base}/readyz")).send().await.is_ok_and(|r| r.status().is_success())
    })
    .await;
    // The reconciler is ready once its control subscriptions are on the server.
    wait_for("reconciler ready", Duration::from_secs(30), || async {
        let Ok(r) = http.get(format!("http://127.0.0.1:{rec_port}/readyz")).send().await else { return false };
        let ok = r.status().is_success();
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(ok, body["serving"] == true && body["database"] == true && body["nats"] == true, "{body}");
        ok
    })
    .await;
    wait_for("worker online", Duration::from_secs(30), || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM workers WHERE status = 'online'")
            .fetch_one(&pool)
            .await
            .unwrap()
            == 1
    })
    .await;
    let task: serde_json::Value = http
        .post(format!("{base}/api/runtime/llm-tasks"))
        .json(&serde_json::json!({"context_id": "c", "agent_slug": "a", "prompt": "traced"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = task["id"].as_str().unwrap().to_owned();
    wait_for("task completed", Duration::from_secs(30), || async {
        sqlx::query_scalar::<_, String>("SELECT status FROM llm_tasks WHERE id = $1")
            .bind(&id)
            .fetch_one(&pool)
            .await
            .unwrap()
            == "completed"
    })
    .await;

    // The API's root span, then the worker's and the reconciler's spans in the same trace.
    wait_for("spans of all three services in one trace", Duration::from_secs(30), || async {
        let spans = spans.lock().unwrap();
        let mut by_trace: HashMap<&Vec<u8>, HashSet<&str>> = HashMap::new();
        for (service, trace, _) in spans.iter() {
            by_trace.entry(trace).or_default().insert(service.as_str());
        }
        by_trace.values().any(|s| ["bloom-api", "bloom-worker", "bloom-reconciler"].iter().all(|x| s.contains(x)))
    })
    .await;
    {
        let spans = spans.lock().unwrap();
        let names: HashSet<&str> = spans.iter().map(|(_, _, n)| n.as_str()).collect();
        for expected in ["submit task", "execute task", "store result"] {
            assert!(names.contains(expected), "missing span {expected}: {names:?}");
        }
    }

    // The metrics moved.
    let metrics = |port: u16| {
        let http = http.clone();
        async move { http.get(format!("http://127.0.0.1:{port}/metrics")).send().await.unwrap().text().await.unwrap() }
    };
    let api_metrics = metrics(api_port).await;
    assert!(api_metrics.contains("bloom_tasks_submitted_total 1"), "{api_metrics}");
    assert!(api_metrics.contains("bloom_tasks_published_total 1"));
    assert!(api_metrics.contains("bloom_tasks{status=\"completed\"} 1"), "{api_metrics}");
    assert!(api_metrics.contains("bloom_queue_depth 0"));
    let rec = metrics(rec_port).await;
    assert!(rec.contains("bloom_claims_granted_total 1"), "{rec}");
    assert!(rec.contains("bloom_results_completed_total 1"));
    assert!(rec.contains("bloom_dispatch_latency_seconds_count 1"));
    let worker = metrics(worker_port).await;
    assert!(worker.contains("bloom_executions_total 1"), "{worker}");

    let js = async_nats::jetstream::new(async_nats::connect(nats_url()).await.unwrap());
    let names = bloom::bus::Names::new(&ns).unwrap();
    let _ = js.delete_stream(names.tasks_stream()).await;
    let _ = js.delete_stream(names.results_stream()).await;
}
