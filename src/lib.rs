//! BLOOM runtime: a dispatcher that hands LLM tasks to a fleet of workers and never loses one.
//!
//! Map of the crate (dependencies point downwards only):
//!
//! * [`domain`]: task, lease, worker, result and audit types and the pure rules of the
//!   task state machine. No I/O.
//! * [`protocol`]: the messages that cross NATS between API, worker and reconciler.
//! * [`db`]: the Postgres pool, migrations and all SQL, every statement checked at
//!   compile time (sqlx macros against `.sqlx/`). [`db::lifecycle`] holds every guarded
//!   state transition of a task or lease, one file each (the batch statements in
//!   `.sql` files), each given the time it happens at; every other module goes through it.
//! * [`bus`]: NATS connection, subject and stream names, provisioning from `nats/*.json`,
//!   and the outbox dispatcher that publishes task messages.
//! * [`artifacts`]: artifact storage in S3 with a Postgres fallback.
//! * [`membridge`]: the HTTP client for the membridge control plane.
//! * [`agent`]: the HTTP client for membridge agents, the workers reached over HTTP.
//! * [`api`]: the REST API (axum), compatible with the original TypeScript service; its
//!   request and answer types are the ones its OpenAPI document shows.
//! * [`worker`]: pulls tasks from JetStream, claims them and runs the executor.
//! * [`reconciler`]: claim/heartbeat/result arbitration, outbox relay, lease sweeper,
//!   artifact moves to S3, membridge sync and leader election.
//! * [`config`]: command-line and environment configuration of every binary.
//! * [`process`], [`metrics`], [`telemetry`]: signals, HTTP serving, metrics and logs.

pub mod agent;
pub mod api;
pub mod artifacts;
pub mod bus;
pub mod config;
pub mod db;
pub mod domain;
pub mod membridge;
pub mod metrics;
pub mod process;
pub mod protocol;
pub mod reconciler;
pub mod telemetry;
pub mod time;
pub mod worker;
