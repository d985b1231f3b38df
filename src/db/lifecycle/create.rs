//! `create`: new tasks, queued, with their outbox rows (batch).

use std::collections::HashMap;

use sqlx::types::Json;
use sqlx::PgExecutor;

use crate::db::outbox::Dispatch;
use crate::domain::{new_id, NewTask, Task, TaskId, TaskStatus, WorkerId};

/// Batch creation: `$1` now, `$2` actor, then one array per column of the new tasks.
pub(super) const CREATE_SQL: &str = include_str!("create.sql");

/// Creates tasks, their outbox rows and audit entries in one transaction. A task whose
/// context has an active lease on an online NATS worker with free capacity is routed to
/// that worker (sticky); the others go to the shared pool.
pub async fn create<'c>(
    db: impl PgExecutor<'c>,
    new: Vec<NewTask>,
    actor: &str,
    now: i64,
) -> sqlx::Result<Vec<Dispatch>> {
    let mut created: Vec<Task> = new
        .into_iter()
        .map(|n| Task {
            id: TaskId::generate(),
            routed_to: None,
            context_id: n.context_id,
            agent_slug: n.agent_slug,
            prompt: n.prompt,
            context_hints: n.context_hints,
            policy: n.policy,
            desired_format: n.desired_format,
            status: TaskStatus::Queued,
            created_at: now,
            updated_at: now,
            lease_id: None,
            worker_id: None,
            attempts: 0,
            max_attempts: n.max_attempts,
            dispatch_seq: 1,
        })
        .collect();
    // Borrowed columns are bound as they are (`as _`): the macro's check wants owned
    // values, Postgres checks the array types.
    let column = |f: fn(&Task) -> &str| created.iter().map(f).collect::<Vec<_>>();
    // One statement, so one round trip and one commit for the whole batch.
    let written = sqlx::query_file!(
        "src/db/lifecycle/create.sql",
        now,
        actor,
        column(|t| t.id.as_str()) as _,
        column(|t| &t.context_id) as _,
        column(|t| &t.agent_slug) as _,
        column(|t| &t.prompt) as _,
        created.iter().map(|t| Json(&t.context_hints)).collect::<Vec<_>>() as _,
        created.iter().map(|t| Json(&t.policy)).collect::<Vec<_>>() as _,
        column(|t| t.desired_format.as_str()) as _,
        &created.iter().map(|t| t.max_attempts).collect::<Vec<_>>(),
        &created.iter().map(|_| new_id()).collect::<Vec<_>>(),
        &created
            .iter()
            .map(|t| format!("Task for agent {}, context {}", t.agent_slug, t.context_id))
            .collect::<Vec<_>>(),
    )
    .fetch_all(db)
    .await?;
    let mut by_task: HashMap<TaskId, (i64, Option<WorkerId>)> = written
        .into_iter()
        .map(|r| (TaskId::from(r.task_id), (r.outbox_id, r.routed_to.map(WorkerId::from))))
        .collect();
    Ok(created
        .drain(..)
        .filter_map(|mut task| {
            let (outbox_id, routed) = by_task.remove(&task.id)?;
            task.routed_to = routed;
            Some(Dispatch { outbox_id, task, trace: Vec::new() })
        })
        .collect())
}
