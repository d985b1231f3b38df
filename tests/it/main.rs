//! Integration tests: one binary, real Postgres, NATS JetStream and S3 (moto) over real
//! connections; only membridge is faked, by a server speaking its HTTP API.
//!
//! Each test gets its own database and NATS namespace, so tests run in parallel.

mod common;
mod fake_agent;
mod fake_membridge;

mod agents;
mod api_auth;
mod api_tasks;
mod api_workers;
mod bloomctl;
mod budgets;
mod cancel;
mod concurrency;
mod dedicated;
mod dispatch;
mod drain;

mod lifecycle_races;
mod llm_outcomes;
mod membridge;
mod openapi;
mod operator_views;
mod payloads;
mod plans;
mod processes;
mod projects;
mod reconciler;
mod recovery;
mod reroute;
mod s3;
mod task_control;
mod tracing;
