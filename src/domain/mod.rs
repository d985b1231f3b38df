//! Domain types of the runtime and the pure rules of the task state machine.
//!
//! Every row type here maps one-to-one onto a Postgres row (decoded by the checked
//! statements of `db`, through `db::rows` where a column is JSON) and serializes to the
//! JSON shape of the original service, so there is exactly one mapping between rows,
//! types and API bodies. Ids and states are stored as text (`sqlx::Type`). Nothing in
//! this module performs I/O.

pub mod artifact;
pub mod audit;
pub mod budget;
pub mod concurrency;
pub mod ids;
pub mod json_number;
pub mod lease;
pub mod membridge;
pub mod project;
pub mod result;
pub mod secret;
pub mod task;
pub mod worker;

pub use artifact::{Artifact, ArtifactBody};
pub use audit::{AuditAction, AuditEntry, NewAudit};
pub use budget::{BudgetLimit, BudgetMetric, BudgetPeriod, BudgetRule};
pub use concurrency::{ConcurrencyLimit, ConcurrencyScope, ANY_KEY};
pub use ids::{new_id, ArtifactId, LeaseId, ResultId, TaskId, WorkerId};
pub use lease::{Lease, LeaseStatus};
pub use membridge::{ClientState, ConnectionStatus, Endpoint};
pub use project::{canonical_id, CloneStatus, NewProject, Project, ProjectNode};
pub use result::{ErrorKind, LlmResult, Metrics, Outcome, ResultStatus, Usage};
pub use secret::Secret;
pub use task::{DesiredFormat, NewTask, Policy, Priority, RateLimitHold, RetryPolicy, Task, TaskStatus};
pub use worker::{
    pick_worker, Capabilities, Registration, Worker, WorkerSource, WorkerStatus, WorkerTransport,
    MAX_REGISTERED_CONCURRENCY, UNINSTALLED_AGENT_VERSION, UNKNOWN_AGENT_VERSION,
};
