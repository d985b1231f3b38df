//! `bloomctl`: the operator's CLI. Talks to the REST API (`--api-url`, `RUNTIME_API_KEY`)
//! for tasks, workers, leases, artifacts, audit and stats; to Postgres and NATS directly
//! for `migrate` and `nats apply`; and runs the whole runtime locally with `up`.
//!
//! Output is a table by default and JSON with `--json`. Exit codes: 0 success, 1 error
//! (transport or 5xx), 2 bad usage, 3 not found, 4 refused (4xx), 5 a waited-for task
//! failed or died, 6 waiting timed out.

mod client;
mod submit;
mod table;
mod up;

use std::time::Duration;

use anyhow::Context;
use bloom::bus::provision::ReplicaChange;
use bloom::config::{DbArgs, NatsArgs};
use clap::{Args, Parser, Subcommand};
use client::{exit, Client, Failure};
use serde_json::{json, Value};

/// Operate a BLOOM runtime installation.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    api: ApiTarget,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Debug)]
struct ApiTarget {
    /// Base URL of the REST API.
    #[arg(long, global = true, env = "BLOOM_API_URL", default_value = "http://127.0.0.1:3002")]
    api_url: String,
    /// API key (`X-Runtime-Api-Key`).
    #[arg(long, global = true, env = "RUNTIME_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Apply the database migrations.
    Migrate {
        #[command(flatten)]
        db: DbArgs,
        /// Validate the configuration and exit.
        #[arg(long)]
        check_config: bool,
    },
    /// NATS JetStream definitions.
    Nats {
        #[command(subcommand)]
        command: NatsCommand,
    },
    /// Submit tasks; optionally wait for and print their results.
    Submit(submit::SubmitArgs),
    /// Tasks.
    Tasks {
        #[command(subcommand)]
        command: TasksCommand,
    },
    /// Workers.
    Workers {
        #[command(subcommand)]
        command: WorkersCommand,
    },
    /// Leases.
    Leases {
        /// Only leases in this status.
        #[arg(long)]
        status: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Artifacts.
    Artifacts {
        #[command(subcommand)]
        command: ArtifactsCommand,
    },
    /// The audit log, newest last; `--follow` keeps printing new entries. Filters match
    /// exactly: `--action task_cancelled`, `--entity <task, lease or worker id>`.
    Audit {
        #[arg(long, default_value_t = 20)]
        limit: u32,
        #[arg(long, short)]
        follow: bool,
        #[arg(long)]
        action: Option<String>,
        #[arg(long)]
        entity_type: Option<String>,
        #[arg(long = "entity")]
        entity_id: Option<String>,
        #[arg(long)]
        actor: Option<String>,
    },
    /// Task, lease and worker counts.
    Stats,
    /// Agents, concurrency keys and conversations whose tasks wait for a provider's rate
    /// limit to reset.
    Holds,
    /// Concurrency limits: list them (with what runs and waits under each), set or
    /// remove one. Scopes: context_id, agent_slug, concurrency_key; key `*` is every
    /// key of the scope without a limit of its own.
    Limits {
        #[command(subcommand)]
        command: Option<LimitsCommand>,
    },
    /// The busiest keys under concurrency limits: running and waiting tasks, and the limit.
    Keys {
        #[arg(long, value_parser = ["context_id", "agent_slug", "concurrency_key"])]
        scope: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Budgets: list them (used and remaining in the current window, waiting tasks), set
    /// or remove one. Rules: requests, tokens or usd per minute, hour or day
    /// (`usd-per-day`); key `*` is each key of the scope without a budget of its own.
    Budgets {
        #[command(subcommand)]
        command: Option<BudgetsCommand>,
    },
    /// What each key used of its budgets in the current window, most used first.
    BudgetUsage {
        #[arg(long, value_parser = ["context_id", "agent_slug", "concurrency_key"])]
        scope: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// What runs used and cost, per agent (or `--by context_id`), over the last
    /// `--hours` (default 24).
    Usage {
        #[arg(long, default_value = "agent_slug", value_parser = ["agent_slug", "context_id"])]
        by: String,
        #[arg(long, default_value_t = 24)]
        hours: u32,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Run the whole runtime locally: migrations, stream definitions, the API, two
    /// reconcilers and a worker unless its executor is the built-in test one (binaries
    /// next to bloomctl). Ctrl-C stops it; so does any of them exiting (bloomctl then
    /// exits 1).
    Up {
        #[command(flatten)]
        db: DbArgs,
        #[command(flatten)]
        nats: NatsArgs,
        /// Reconciler replicas.
        #[arg(long, env = "BLOOM_UP_RECONCILERS", default_value_t = 2)]
        reconcilers: usize,
        /// Worker processes (0: none; tasks wait for REST workers and HTTP agents). By
        /// default one when the workers run a command (`BLOOM_EXECUTOR=command`, the
        /// Claude CLI), none when they would run the built-in test executor, which
        /// answers every prompt at once: it takes real tasks only when asked for.
        #[arg(long, env = "BLOOM_UP_WORKERS")]
        workers: Option<usize>,
        /// The workers' executor (read to choose the default number of workers; the
        /// workers read it themselves).
        #[arg(long, env = "BLOOM_EXECUTOR", default_value = "command", value_parser = ["command", "builtin"])]
        executor: String,
        /// HTTP port of the first reconciler; the next ones count up by two; 0: none.
        #[arg(long, env = "BLOOM_RECONCILER_HTTP_PORT", default_value_t = 9090)]
        reconciler_port: u16,
        /// HTTP port of the first worker; the next ones count up by two; 0: none.
        #[arg(long, env = "BLOOM_WORKER_HTTP_PORT", default_value_t = 9091)]
        worker_port: u16,
    },
}

#[derive(Subcommand, Debug)]
enum NatsCommand {
    /// Create or update the streams and consumers of `nats/*.json`.
    Apply {
        #[command(flatten)]
        nats: NatsArgs,
        /// Validate the configuration and exit.
        #[arg(long)]
        check_config: bool,
    },
    /// Delete the namespace's streams, their consumers and every message in them, to tear
    /// an installation down: stop its api, reconcilers and workers first. Queued tasks
    /// whose messages are deleted are not sent again.
    Delete {
        #[command(flatten)]
        nats: NatsArgs,
        /// Confirm the deletion.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Subcommand, Debug)]
enum TasksCommand {
    /// Newest first.
    List {
        /// One status, or several separated by commas.
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        context: Option<String>,
        #[arg(long)]
        agent: Option<String>,
        #[arg(long, allow_negative_numbers = true)]
        priority: Option<i32>,
        /// Only tasks whose prompt starts with this text (ignoring case).
        #[arg(long)]
        prompt: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    Show {
        id: String,
    },
    /// Requeue failed, dead or cancelled tasks: the given ids, or with --context /
    /// --agent (and --status) every such task of that context or agent (at most 1000
    /// per call; --dry-run counts them first).
    Requeue {
        #[command(flatten)]
        selection: Selection,
        /// Among failed, dead, cancelled, separated by commas (default all three).
        #[arg(long)]
        status: Option<String>,
    },
    /// Cancel queued, leased or running tasks (a running one's executor is killed): the
    /// given ids, or with --context / --agent every unfinished task of that context or
    /// agent (at most 1000 per call; --dry-run counts them first).
    Cancel {
        #[command(flatten)]
        selection: Selection,
    },
}

/// The tasks a bulk command acts on: ids, or every task of a context or agent, or
/// whose prompt starts with a text.
#[derive(Args, Debug)]
struct Selection {
    #[arg(required_unless_present_any = ["context", "agent", "prompt"])]
    ids: Vec<String>,
    #[arg(long)]
    context: Option<String>,
    #[arg(long)]
    agent: Option<String>,
    /// Tasks whose prompt starts with this text (ignoring case).
    #[arg(long)]
    prompt: Option<String>,
    #[arg(long)]
    dry_run: bool,
}

impl Selection {
    /// Whether it names tasks by a filter (the bulk route), not by id only.
    fn by_filter(&self) -> bool {
        self.context.is_some() || self.agent.is_some() || self.prompt.is_some()
    }

    /// The body of the bulk routes.
    fn body(self) -> Value {
        let mut body = json!({"dry_run": self.dry_run});
        if let Some(c) = self.context {
            body["context_id"] = json!(c);
        }
        if let Some(a) = self.agent {
            body["agent_slug"] = json!(a);
        }
        if let Some(p) = self.prompt {
            body["prompt_prefix"] = json!(p);
        }
        if !self.ids.is_empty() {
            body["ids"] = json!(self.ids);
        }
        body
    }
}

#[derive(Subcommand, Debug)]
enum WorkersCommand {
    List,
    Show {
        id: String,
    },
    /// The worker takes no new task and finishes those it runs; it stays registered.
    Drain {
        id: String,
    },
    /// A drained worker takes tasks again.
    Resume {
        id: String,
    },
}

#[derive(Subcommand, Debug)]
enum LimitsCommand {
    /// Every limit (the default).
    List,
    /// At most `max_running` tasks of the key leased or running at once (0 holds them).
    Set {
        #[arg(value_parser = ["context_id", "agent_slug", "concurrency_key"])]
        scope: String,
        key: String,
        max_running: u32,
    },
    /// Remove a limit: its waiting tasks are dispatched.
    Delete {
        #[arg(value_parser = ["context_id", "agent_slug", "concurrency_key"])]
        scope: String,
        key: String,
    },
}

#[derive(Subcommand, Debug)]
enum BudgetsCommand {
    /// Every budget (the default).
    List,
    /// At most `max` per window (0 holds the key's tasks); `--estimate`: what each run
    /// reserves (tokens, USD), else the key's average so far.
    Set {
        #[arg(value_parser = ["context_id", "agent_slug", "concurrency_key"])]
        scope: String,
        key: String,
        /// `<requests|tokens|usd>-per-<minute|hour|day>`
        rule: String,
        max: f64,
        #[arg(long)]
        estimate: Option<f64>,
    },
    /// Remove a budget: its waiting tasks are admitted again.
    Delete {
        #[arg(value_parser = ["context_id", "agent_slug", "concurrency_key"])]
        scope: String,
        key: String,
        rule: String,
    },
}

#[derive(Subcommand, Debug)]
enum ArtifactsCommand {
    List {
        #[arg(long)]
        task_id: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    Show {
        id: String,
    },
    /// Print an artifact's content.
    Content {
        id: String,
    },
}

const TASK_COLUMNS: [(&str, &str); 7] = [
    ("ID", "/id"),
    ("STATUS", "/status"),
    ("PRIORITY", "/priority"),
    ("AGENT", "/agent_slug"),
    ("CONTEXT", "/context_id"),
    ("ATTEMPTS", "/attempts"),
    ("WORKER", "/worker_id"),
];

fn print(json_out: bool, v: &Value, columns: &[(&str, &str)]) {
    if json_out {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    } else if let Value::Array(rows) = v {
        print!("{}", table::render(rows, columns));
    } else {
        print!("{}", table::record(v));
    }
}

fn query(pairs: &[(&str, Option<String>)]) -> String {
    let q: Vec<String> =
        pairs.iter().filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", bloom::membridge::encode(v)))).collect();
    if q.is_empty() {
        String::new()
    } else {
        format!("?{}", q.join("&"))
    }
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let code = match run(cli).await {
        Ok(code) => code,
        Err(f) => {
            eprintln!("bloomctl: {}", f.message);
            f.code
        }
    };
    std::process::exit(code);
}

fn failure(e: anyhow::Error) -> Failure {
    Failure::new(exit::ERROR, format!("{e:#}"))
}

async fn run(cli: Cli) -> Result<i32, Failure> {
    let api = Client::new(&cli.api.api_url, cli.api.api_key.clone());
    let json_out = cli.api.json;
    match cli.command {
        Command::Migrate { db, check_config } => {
            if check_config {
                println!("{db:#?}");
                return Ok(exit::OK);
            }
            let _telemetry = bloom::telemetry::init("text", "bloomctl");
            migrate(&db).await.map_err(failure)?;
            println!("migrations applied");
        }
        Command::Nats { command: NatsCommand::Apply { nats, check_config } } => {
            let names = nats.names().map_err(|e| Failure::new(exit::USAGE, e))?;
            if check_config {
                println!("{nats:#?}");
                return Ok(exit::OK);
            }
            let _telemetry = bloom::telemetry::init("text", "bloomctl");
            nats_apply(&nats, &names).await.map_err(failure)?;
            println!("streams {} and {} applied", names.tasks_stream(), names.results_stream());
        }
        Command::Nats { command: NatsCommand::Delete { nats, yes } } => {
            let names = nats.names().map_err(|e| Failure::new(exit::USAGE, e))?;
            if !yes {
                let what = format!("{} and {}", names.tasks_stream(), names.results_stream());
                return Err(Failure::new(exit::USAGE, format!("this deletes streams {what}; pass --yes")));
            }
            let _telemetry = bloom::telemetry::init("text", "bloomctl");
            let deleted = nats_delete(&nats, &names).await.map_err(failure)?;
            println!("streams deleted: {}", if deleted.is_empty() { "none".to_owned() } else { deleted.join(", ") });
        }
        Command::Submit(args) => return submit::run(&api, args, json_out).await,
        Command::Tasks { command } => match command {
            TasksCommand::List { status, context, agent, priority, prompt, limit } => {
                let path = format!(
                    "/api/runtime/llm-tasks{}",
                    query(&[
                        ("status", status),
                        ("context_id", context),
                        ("agent_slug", agent),
                        ("priority", priority.map(|p| p.to_string())),
                        ("prompt_prefix", prompt),
                    ])
                );
                let rows = api.get_up_to(&path, limit).await?;
                print(json_out, &Value::Array(rows), &TASK_COLUMNS);
            }
            TasksCommand::Show { id } => {
                let v = api.get(&format!("/api/runtime/llm-tasks/{}", bloom::membridge::encode(&id))).await?;
                print(json_out, &v, &[]);
            }
            TasksCommand::Requeue { selection, status } if selection.by_filter() => {
                let mut body = selection.body();
                if let Some(s) = status {
                    body["status"] = json!(s.split(',').map(str::trim).collect::<Vec<_>>());
                }
                let v = api.post("/api/runtime/llm-tasks/requeue", &body).await?;
                print(json_out, &v, &[]);
            }
            TasksCommand::Requeue { selection, .. } => {
                for id in selection.ids {
                    let v = api
                        .post(&format!("/api/runtime/llm-tasks/{}/requeue", bloom::membridge::encode(&id)), &json!({}))
                        .await?;
                    print(json_out, &v, &[]);
                }
            }
            TasksCommand::Cancel { selection } if selection.by_filter() => {
                let body = selection.body();
                let v = api.post("/api/runtime/llm-tasks/cancel", &body).await?;
                print(json_out, &v, &[]);
            }
            TasksCommand::Cancel { selection } => {
                for id in selection.ids {
                    let v = api
                        .post(&format!("/api/runtime/llm-tasks/{}/cancel", bloom::membridge::encode(&id)), &json!({}))
                        .await?;
                    print(json_out, &v, &[]);
                }
            }
        },
        Command::Workers { command } => match command {
            WorkersCommand::List => {
                let v = api.get("/api/runtime/workers").await?;
                let cols = [
                    ("ID", "/id"),
                    ("STATUS", "/status"),
                    ("DRAINING_SINCE", "/draining_since"),
                    ("ACTIVE", "/active_leases"),
                    ("MAX", "/capabilities/max_concurrency"),
                    ("CLAUDE_CLI", "/capabilities/claude_cli"),
                    ("LAST_HEARTBEAT", "/last_heartbeat"),
                ];
                print(json_out, &v, &cols);
            }
            WorkersCommand::Show { id } => {
                let v = api.get(&format!("/api/runtime/workers/{}", bloom::membridge::encode(&id))).await?;
                print(json_out, &v, &[]);
            }
            WorkersCommand::Drain { id } => {
                let v = api
                    .post(&format!("/api/runtime/workers/{}/drain", bloom::membridge::encode(&id)), &json!({}))
                    .await?;
                print(json_out, &v, &[]);
            }
            WorkersCommand::Resume { id } => {
                let v = api
                    .post(&format!("/api/runtime/workers/{}/resume", bloom::membridge::encode(&id)), &json!({}))
                    .await?;
                print(json_out, &v, &[]);
            }
        },
        Command::Leases { status, limit } => {
            let v = api
                .get(&format!(
                    "/api/runtime/leases{}",
                    query(&[("status", status), ("limit", Some(limit.to_string()))])
                ))
                .await?;
            let cols = [
                ("ID", "/id"),
                ("TASK", "/task_id"),
                ("WORKER", "/worker_id"),
                ("STATUS", "/status"),
                ("EXPIRES_AT", "/expires_at"),
            ];
            print(json_out, &v, &cols);
        }
        Command::Artifacts { command } => match command {
            ArtifactsCommand::List { task_id, limit } => {
                let v = api
                    .get(&format!(
                        "/api/runtime/artifacts{}",
                        query(&[("task_id", task_id), ("limit", Some(limit.to_string()))])
                    ))
                    .await?;
                let cols = [
                    ("ID", "/id"),
                    ("TASK", "/task_id"),
                    ("TYPE", "/type"),
                    ("URL", "/url"),
                    ("CREATED_AT", "/created_at"),
                ];
                print(json_out, &v, &cols);
            }
            ArtifactsCommand::Show { id } => {
                let v = api.get(&format!("/api/runtime/artifacts/{}", bloom::membridge::encode(&id))).await?;
                print(json_out, &v, &[]);
            }
            ArtifactsCommand::Content { id } => {
                let text =
                    api.get_text(&format!("/api/runtime/artifacts/{}/content", bloom::membridge::encode(&id))).await?;
                println!("{text}");
            }
        },
        Command::Audit { limit, follow, action, entity_type, entity_id, actor } => {
            let path = format!(
                "/api/runtime/audit{}",
                query(&[
                    ("limit", Some(limit.clamp(1, 1000).to_string())),
                    ("action", action),
                    ("entity_type", entity_type),
                    ("entity_id", entity_id),
                    ("actor", actor),
                ])
            );
            return audit(&api, &path, follow, json_out).await;
        }
        Command::Stats => {
            let v = api.get("/api/runtime/stats").await?;
            if json_out {
                print(true, &v, &[]);
            } else {
                println!("tasks    total {}  {}", v["tasks"]["total"], v["tasks"]["by_status"]);
                println!("leases   total {}  active {}", v["leases"]["total"], v["leases"]["active"]);
                println!("workers  total {}  online {}", v["workers"]["total"], v["workers"]["online"]);
            }
        }
        Command::Limits { command } => {
            const COLUMNS: [(&str, &str); 5] = [
                ("SCOPE", "/scope"),
                ("KEY", "/key"),
                ("MAX_RUNNING", "/max_running"),
                ("RUNNING", "/running"),
                ("WAITING", "/waiting"),
            ];
            let limit_path = |scope: &str, key: &str| {
                format!("/api/runtime/concurrency-limits/{scope}/{}", bloom::membridge::encode(key))
            };
            match command.unwrap_or(LimitsCommand::List) {
                LimitsCommand::List => print(json_out, &api.get("/api/runtime/concurrency-limits").await?, &COLUMNS),
                LimitsCommand::Set { scope, key, max_running } => {
                    let v =
                        api.put(&limit_path(&scope, &key), &serde_json::json!({"max_running": max_running})).await?;
                    print(json_out, &Value::Array(vec![v]), &COLUMNS);
                }
                LimitsCommand::Delete { scope, key } => {
                    let v = api.delete(&limit_path(&scope, &key)).await?;
                    if json_out {
                        print(true, &v, &[]);
                    } else {
                        println!("removed {scope} {key}");
                    }
                }
            }
        }
        Command::Budgets { command } => {
            const COLUMNS: [(&str, &str); 8] = [
                ("SCOPE", "/scope"),
                ("KEY", "/key"),
                ("RULE", "/rule"),
                ("MAX", "/max"),
                ("USED", "/used"),
                ("REMAINING", "/remaining"),
                ("WAITING", "/waiting"),
                ("RESETS_AT", "/resets_at"),
            ];
            let budget_path = |scope: &str, key: &str, rule: &str| {
                format!(
                    "/api/runtime/budgets/{scope}/{}/{}",
                    bloom::membridge::encode(key),
                    bloom::membridge::encode(rule)
                )
            };
            match command.unwrap_or(BudgetsCommand::List) {
                BudgetsCommand::List => print(json_out, &api.get("/api/runtime/budgets").await?, &COLUMNS),
                BudgetsCommand::Set { scope, key, rule, max, estimate } => {
                    let body = serde_json::json!({"max": max, "estimate": estimate});
                    let v = api.put(&budget_path(&scope, &key, &rule), &body).await?;
                    print(json_out, &Value::Array(vec![v]), &COLUMNS);
                }
                BudgetsCommand::Delete { scope, key, rule } => {
                    let v = api.delete(&budget_path(&scope, &key, &rule)).await?;
                    if json_out {
                        print(true, &v, &[]);
                    } else {
                        println!("removed {scope} {key} {rule}");
                    }
                }
            }
        }
        Command::BudgetUsage { scope, limit } => {
            let scope = scope.map(|s| format!("&scope={s}")).unwrap_or_default();
            let v = api.get(&format!("/api/runtime/budget-usage?limit={limit}{scope}")).await?;
            let columns = [
                ("SCOPE", "/scope"),
                ("KEY", "/key"),
                ("METRIC", "/metric"),
                ("PERIOD", "/period"),
                ("MAX", "/max"),
                ("USED", "/used"),
                ("REMAINING", "/remaining"),
                ("WAITING", "/waiting"),
            ];
            print(json_out, &v, &columns);
        }
        Command::Keys { scope, limit } => {
            let scope = scope.map(|s| format!("&scope={s}")).unwrap_or_default();
            let v = api.get(&format!("/api/runtime/concurrency-keys?limit={limit}{scope}")).await?;
            let columns = [
                ("SCOPE", "/scope"),
                ("KEY", "/key"),
                ("MAX_RUNNING", "/max_running"),
                ("RUNNING", "/running"),
                ("WAITING", "/waiting"),
            ];
            print(json_out, &v, &columns);
        }
        Command::Holds => {
            let v = api.get("/api/runtime/holds").await?;
            let columns = [("SCOPE", "/scope"), ("KEY", "/key"), ("UNTIL", "/until"), ("REASON", "/reason")];
            print(json_out, &v, &columns);
        }
        Command::Usage { by, hours, limit } => {
            let to = bloom::time::now_ms();
            let from = to - i64::from(hours) * 3_600_000;
            let v = api.get(&format!("/api/runtime/usage?group_by={by}&from={from}&to={to}&limit={limit}")).await?;
            if json_out {
                print(true, &v, &[]);
            } else {
                let mut rows = v["groups"].as_array().cloned().unwrap_or_default();
                let mut total = v["total"].clone();
                total["key"] = Value::from("(total)");
                rows.push(total);
                let columns = [
                    (if by == "context_id" { "CONTEXT" } else { "AGENT" }, "/key"),
                    ("RUNS", "/runs"),
                    ("ERRORS", "/errors"),
                    ("COST_USD", "/total_cost_usd"),
                    ("INPUT", "/input_tokens"),
                    ("OUTPUT", "/output_tokens"),
                    ("CACHE_READ", "/cache_read_input_tokens"),
                    ("CACHE_WRITE", "/cache_creation_input_tokens"),
                    ("TURNS", "/num_turns"),
                ];
                print(false, &Value::Array(rows), &columns);
            }
        }
        Command::Up { db, nats, reconcilers, workers, executor, reconciler_port, worker_port } => {
            let workers = workers.unwrap_or_else(|| up::default_workers(&executor));
            let plan = up::Plan { reconcilers, workers, reconciler_port, worker_port };
            up(&db, &nats, &plan).await.map_err(failure)?
        }
    }
    Ok(exit::OK)
}

async fn migrate(db: &DbArgs) -> anyhow::Result<()> {
    let pool = bloom::db::connect(db.database_url.expose(), &db.pool_options())
        .await
        .context("connecting to Postgres (DATABASE_URL)")?;
    bloom::db::migrate(&pool).await.context("applying migrations")?;
    Ok(())
}

async fn jetstream(nats: &NatsArgs) -> anyhow::Result<async_nats::jetstream::Context> {
    let client = tokio::time::timeout(Duration::from_secs(10), bloom::bus::connect(&nats.nats_url, "bloomctl"))
        .await
        .context("timed out connecting to NATS")??;
    Ok(bloom::bus::jetstream(client, nats.timeout()))
}

async fn nats_apply(nats: &NatsArgs, names: &bloom::bus::Names) -> anyhow::Result<()> {
    use bloom::bus::provision::{apply_patiently, START_PATIENCE};
    apply_patiently(&jetstream(nats).await?, names, &nats.streams(), ReplicaChange::Change, START_PATIENCE).await?;
    Ok(())
}

async fn nats_delete(nats: &NatsArgs, names: &bloom::bus::Names) -> anyhow::Result<Vec<String>> {
    Ok(bloom::bus::provision::delete(&jetstream(nats).await?, names).await?)
}

async fn audit(api: &Client, path: &str, follow: bool, json_out: bool) -> Result<i32, Failure> {
    let cols = [
        ("TIMESTAMP", "/timestamp"),
        ("ACTION", "/action"),
        ("ENTITY", "/entity_id"),
        ("ACTOR", "/actor"),
        ("DETAIL", "/detail"),
    ];
    let mut seen = std::collections::HashSet::new();
    let mut first = true;
    loop {
        let v = api.get(path).await?;
        let mut fresh: Vec<Value> = v
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|e| seen.insert(e["id"].to_string()))
            .collect();
        fresh.reverse();
        if !fresh.is_empty() {
            if json_out {
                for e in &fresh {
                    println!("{e}");
                }
            } else {
                let text = table::render(&fresh, &cols);
                // The header once.
                let text = if first { text } else { text.lines().skip(1).map(|l| format!("{l}\n")).collect() };
                print!("{text}");
            }
            first = false;
        }
        if !follow {
            return Ok(exit::OK);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn up(db: &DbArgs, nats: &NatsArgs, plan: &up::Plan) -> anyhow::Result<()> {
    let _telemetry = bloom::telemetry::init("text", "bloomctl");
    let names = nats.names().map_err(anyhow::Error::msg)?;
    migrate(db).await?;
    nats_apply(nats, &names).await?;
    up::run(plan).await
}
