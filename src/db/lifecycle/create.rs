//! `create`: new tasks, queued, with their outbox rows (batch), and the idempotency
//! keys they were submitted with.

use std::collections::{HashMap, HashSet};

use sqlx::types::Json;
use sqlx::{Acquire, PgConnection};

use crate::db::idempotency::{self, KeyRecord};
use crate::db::outbox::Dispatch;
use crate::db::tasks;
use crate::domain::{new_id, NewTask, Task, TaskId, TaskStatus, WorkerId};

/// Batch creation: `$1` now, `$2` actor, then one array per column of the new tasks.
pub(super) const CREATE_SQL: &str = include_str!("create.sql");

/// What became of one submission.
#[derive(Clone, Debug)]
pub enum Submitted {
    /// A new task, dispatched (its outbox row written).
    Created(Dispatch),
    /// A new delayed task: the due duty dispatches it at its `not_before`.
    Scheduled(Task),
    /// Its idempotency key was used within the window by the same request: that
    /// request's task, as it is now.
    Existing(Task),
    /// Its idempotency key was used within the window by a different request.
    KeyConflict { key: String, task_id: TaskId },
    /// Not created: its batch was all or nothing and another request of it conflicted.
    Withdrawn,
}

/// What a batch does when a request's key was used by a different request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnKeyConflict {
    /// Answer that request with the conflict, create the others.
    Answer,
    /// Create nothing: the conflicting requests are answered with their conflicts, the
    /// others are [`Submitted::Withdrawn`].
    Withdraw,
}

/// How idempotency keys are honoured. The default keeps every record (no window) and
/// answers conflicts one by one.
#[derive(Clone, Copy, Debug)]
pub struct KeyRules {
    /// Records older than this (epoch ms) are forgotten: their keys can be used again.
    pub window_start: i64,
    pub on_conflict: OnKeyConflict,
}

impl Default for KeyRules {
    fn default() -> Self {
        KeyRules { window_start: i64::MIN, on_conflict: OnKeyConflict::Answer }
    }
}

impl Submitted {
    /// The dispatch of a task created undelayed.
    pub fn into_dispatch(self) -> Option<Dispatch> {
        match self {
            Submitted::Created(d) => Some(d),
            _ => None,
        }
    }

    /// The task the submission names (none for a conflict).
    pub fn task(&self) -> Option<&Task> {
        match self {
            Submitted::Created(d) => Some(&d.task),
            Submitted::Scheduled(t) | Submitted::Existing(t) => Some(t),
            Submitted::KeyConflict { .. } | Submitted::Withdrawn => None,
        }
    }
}

/// Creates tasks with their outbox rows and audit entries, in one transaction; answers
/// one [`Submitted`] per request, in order. A task whose context has an active lease on
/// an online NATS worker with free capacity is routed to that worker (sticky); the
/// others go to the shared pool. A request with an idempotency key whose record is
/// within the window creates nothing: it gets the recorded task when its fields are the
/// same, a conflict when they differ (also within one batch).
pub async fn create(
    db: &mut PgConnection,
    new: Vec<NewTask>,
    actor: &str,
    now: i64,
    keys: KeyRules,
) -> sqlx::Result<Vec<Submitted>> {
    if new.iter().all(|n| n.idempotency_key.is_none()) {
        // One statement, so one round trip and one commit for the whole batch.
        let tasks = new.into_iter().map(|n| new_task(n, now)).collect();
        return insert(db, tasks, actor, now).await;
    }
    let mut tx = db.begin().await?;
    // The first request of each key in the batch may take it (its index, and its record
    // in `records`); later ones answer to it.
    let mut first_of_key: HashMap<String, (usize, usize)> = HashMap::new();
    let mut hashes = Vec::with_capacity(new.len());
    let mut records = Vec::new();
    let tasks: Vec<Task> = new
        .into_iter()
        .enumerate()
        .map(|(i, n)| {
            let hash = n.idempotency_key.as_ref().map(|_| n.request_hash());
            let task = new_task(n, now);
            if let (Some(key), Some(h)) = (&task.idempotency_key, &hash) {
                first_of_key.entry(key.clone()).or_insert_with(|| {
                    records.push(KeyRecord { key: key.clone(), task_id: task.id.0.clone(), request_hash: h.clone() });
                    (i, records.len() - 1)
                });
            }
            hashes.push(hash);
            task
        })
        .collect();
    let taken: HashSet<String> =
        idempotency::take(&mut tx, &records, keys.window_start, now).await?.into_iter().collect();
    let held: Vec<String> = records.iter().map(|r| &r.key).filter(|k| !taken.contains(*k)).cloned().collect();
    let held: HashMap<String, KeyRecord> =
        idempotency::get_many(&mut *tx, &held).await?.into_iter().map(|r| (r.key.clone(), r)).collect();
    let held_tasks: HashMap<TaskId, Task> =
        tasks::get_many(&mut *tx, &held.values().map(|r| r.task_id.clone()).collect::<Vec<_>>())
            .await?
            .into_iter()
            .map(|t| (t.id.clone(), t))
            .collect();
    // Each request: to create, or answered by a key's record.
    enum Plan {
        Create,
        Answer(Box<Submitted>),
        SameAs(usize),
    }
    let mut plans = Vec::with_capacity(tasks.len());
    let mut fresh = Vec::new();
    for (i, (task, hash)) in tasks.into_iter().zip(hashes).enumerate() {
        let Some((key, hash)) = task.idempotency_key.clone().zip(hash) else {
            plans.push(Plan::Create);
            fresh.push(task);
            continue;
        };
        let plan = if let Some(record) = held.get(&key) {
            let id = TaskId(record.task_id.clone());
            match held_tasks.get(&id) {
                Some(t) if record.request_hash == hash => Plan::Answer(Box::new(Submitted::Existing(t.clone()))),
                _ => Plan::Answer(Box::new(Submitted::KeyConflict { key, task_id: id })),
            }
        } else {
            let (first, record) = first_of_key[&key];
            let record = &records[record];
            if first == i {
                fresh.push(task);
                Plan::Create
            } else if record.request_hash == hash {
                Plan::SameAs(first)
            } else {
                Plan::Answer(Box::new(Submitted::KeyConflict { key, task_id: TaskId(record.task_id.clone()) }))
            }
        };
        plans.push(plan);
    }
    let conflicted = plans.iter().any(|p| matches!(p, Plan::Answer(a) if matches!(**a, Submitted::KeyConflict { .. })));
    if conflicted && keys.on_conflict == OnKeyConflict::Withdraw {
        // Dropping the transaction rolls back the keys it took.
        return Ok(plans
            .into_iter()
            .map(|p| match p {
                Plan::Answer(a) if matches!(*a, Submitted::KeyConflict { .. }) => *a,
                _ => Submitted::Withdrawn,
            })
            .collect());
    }
    let mut created = insert(&mut tx, fresh, actor, now).await?.into_iter();
    tx.commit().await?;
    let mut out: Vec<Submitted> = Vec::with_capacity(plans.len());
    for plan in plans {
        let answer = match plan {
            Plan::Create => created.next().expect("one creation per planned task"),
            Plan::Answer(a) => *a,
            Plan::SameAs(first) => match out[first].task() {
                Some(t) => Submitted::Existing(t.clone()),
                None => out[first].clone(),
            },
        };
        out.push(answer);
    }
    Ok(out)
}

fn new_task(n: NewTask, now: i64) -> Task {
    Task {
        id: TaskId::generate(),
        routed_to: None,
        not_before: n.due_at(now),
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
        priority: n.priority,
        idempotency_key: n.idempotency_key,
        concurrency_key: n.concurrency_key,
        wait_reason: None,
        last_error: None,
        dispatch_seq: 1,
    }
}

/// Inserts tasks (their outbox rows and audit entries) in one statement; answers in order.
async fn insert(db: &mut PgConnection, mut created: Vec<Task>, actor: &str, now: i64) -> sqlx::Result<Vec<Submitted>> {
    if created.is_empty() {
        return Ok(Vec::new());
    }
    // Borrowed columns are bound as they are (`as _`): the macro's check wants owned
    // values, Postgres checks the array types.
    let column = |f: fn(&Task) -> &str| created.iter().map(f).collect::<Vec<_>>();
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
        &created.iter().map(audit_detail).collect::<Vec<_>>(),
        &created.iter().map(|t| t.priority.0).collect::<Vec<_>>(),
        &created.iter().map(|t| t.not_before).collect::<Vec<_>>() as _,
        created.iter().map(|t| t.idempotency_key.as_deref()).collect::<Vec<_>>() as _,
        created.iter().map(|t| t.concurrency_key.as_deref()).collect::<Vec<_>>() as _,
    )
    .fetch_all(&mut *db)
    .await?;
    let mut by_task: HashMap<TaskId, (Option<i64>, Option<WorkerId>)> = written
        .into_iter()
        .map(|r| (TaskId::from(r.task_id), (r.outbox_id, r.routed_to.map(WorkerId::from))))
        .collect();
    Ok(created
        .drain(..)
        .filter_map(|mut task| {
            let (outbox_id, routed) = by_task.remove(&task.id)?;
            task.routed_to = routed;
            Some(match outbox_id {
                Some(outbox_id) => Submitted::Created(Dispatch { outbox_id, task, trace: Vec::new() }),
                None => {
                    task.dispatch_seq = 0;
                    Submitted::Scheduled(task)
                }
            })
        })
        .collect())
}

fn audit_detail(t: &Task) -> String {
    let mut detail = format!("Task for agent {}, context {}", t.agent_slug, t.context_id);
    if t.priority.0 != 0 {
        detail.push_str(&format!(", priority {}", t.priority.0));
    }
    if let Some(at) = t.not_before {
        detail.push_str(&format!(", not dispatched before {at}"));
    }
    if let Some(key) = &t.concurrency_key {
        detail.push_str(&format!(", concurrency key {key}"));
    }
    detail
}
