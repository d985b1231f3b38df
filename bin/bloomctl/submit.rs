//! `bloomctl submit [--count N] [--wait]`, and `bloomctl submit --file prompts.jsonl`
//! (one task per line, sent 1,000 at a time through the batch route).
//!
//! Each task's id is printed as soon as it is created. Waiting costs a request per poll
//! whatever the number of tasks: the task list is read newest first, page by page, down
//! to the oldest task still pending; the outputs are read from the artifact list the
//! same way (S3-stored ones through the content route). Rate limiting (429) is waited
//! out by the [`Client`].

use std::collections::HashMap;
use std::io::Read;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::{json, Value};

use crate::client::{exit, Client, Failure};
use crate::table;

/// Arguments of `submit`.
#[derive(Args, Debug)]
pub struct SubmitArgs {
    /// The prompt; `-` or absent with no --file reads stdin.
    prompt: Option<String>,
    /// Read the prompt from a file; a `.jsonl` file holds one task per line instead: a
    /// JSON object with a `prompt` (its other fields override the options), or a JSON
    /// string that is the prompt.
    #[arg(long, conflicts_with = "prompt")]
    file: Option<PathBuf>,
    #[arg(long, default_value = "bloomctl")]
    context_id: String,
    #[arg(long, default_value = "default")]
    agent_slug: String,
    #[arg(long)]
    timeout_sec: Option<u32>,
    #[arg(long)]
    budget: Option<f64>,
    /// `json` or `text`.
    #[arg(long)]
    desired_format: Option<String>,
    #[arg(long)]
    max_attempts: Option<u32>,
    /// -2 (background) to 2 (most urgent); 0 by default.
    #[arg(long, allow_negative_numbers = true)]
    priority: Option<i32>,
    /// Do not dispatch before this many milliseconds from now.
    #[arg(long)]
    delay_ms: Option<u64>,
    /// Idempotency key (repeating the command returns the same task).
    #[arg(long, conflicts_with = "file")]
    idempotency_key: Option<String>,
    /// Submit the prompt this many times.
    #[arg(long, default_value_t = 1)]
    count: u32,
    /// Wait for the tasks to finish and print their results.
    #[arg(long)]
    wait: bool,
    /// Give up waiting after this many seconds.
    #[arg(long, default_value_t = 600)]
    wait_timeout: u64,
}

/// Page size of the listings read while waiting.
const TASK_PAGE: u32 = 1000;
/// Artifacts carry their content when it is stored in Postgres: smaller pages.
const ARTIFACT_PAGE: u32 = 100;
/// First and longest pause between polls.
const POLL_MIN: Duration = Duration::from_millis(250);
const POLL_MAX: Duration = Duration::from_secs(2);

/// A submitted task: its id and creation time (epoch ms, the list's sort key).
struct Submitted {
    id: String,
    created_at: i64,
}

impl Submitted {
    /// A created task, its id printed: on stdout when the ids are the command's output,
    /// else on stderr.
    fn announce(task: &Value, ids_on_stdout: bool) -> Submitted {
        let id = task["id"].as_str().unwrap_or_default().to_owned();
        if ids_on_stdout {
            println!("{id}");
        } else {
            eprintln!("submitted {id}");
        }
        Submitted { id, created_at: task["created_at"].as_i64().unwrap_or(0) }
    }
}

/// Runs `submit`; answers the exit code.
pub async fn run(api: &Client, args: SubmitArgs, json_out: bool) -> Result<i32, Failure> {
    let lines = args.file.as_ref().filter(|f| f.extension().is_some_and(|e| e == "jsonl" || e == "ndjson"));
    let submitted = match lines {
        Some(path) => {
            let bodies = read_lines(&args, path)?;
            create_batches(api, &bodies, !args.wait && !json_out).await?
        }
        None => {
            let body = task_body(&args, read_prompt(&args)?);
            create(api, &body, args.count.max(1), !args.wait && !json_out).await?
        }
    };
    if !args.wait {
        if json_out {
            println!("{}", json!(submitted.iter().map(|s| &s.id).collect::<Vec<_>>()));
        }
        return Ok(exit::OK);
    }
    let deadline = Instant::now() + Duration::from_secs(args.wait_timeout);
    let tasks = wait(api, &submitted, deadline, submitted.len() > 1 && !json_out).await?;
    let outputs = outputs(api, &tasks, oldest(&submitted)).await?;
    let mut out = Vec::with_capacity(tasks.len());
    for t in &tasks {
        let output = t["id"].as_str().and_then(|id| outputs.get(id)).cloned();
        let error = if t["status"] == "completed" { None } else { error_of(api, t).await? };
        out.push(json!({"id": t["id"], "status": t["status"], "attempts": t["attempts"], "output": output,
                        "error": error}));
    }
    print_results(&out, json_out);
    let failed = out.iter().any(|o| o["status"] != "completed");
    Ok(if failed { exit::TASK_FAILED } else { exit::OK })
}

fn read_prompt(args: &SubmitArgs) -> Result<String, Failure> {
    let prompt = match (&args.file, args.prompt.as_deref()) {
        (Some(path), _) => std::fs::read_to_string(path)
            .map_err(|e| Failure::new(exit::USAGE, format!("reading {}: {e}", path.display())))?,
        (None, Some(p)) if p != "-" => p.to_owned(),
        _ => {
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s).map_err(|e| Failure::new(exit::USAGE, e.to_string()))?;
            s
        }
    };
    Ok(prompt)
}

fn task_body(args: &SubmitArgs, prompt: String) -> Value {
    let mut body = json!({"context_id": args.context_id, "agent_slug": args.agent_slug, "prompt": prompt});
    if args.timeout_sec.is_some() || args.budget.is_some() {
        body["policy"] = json!({"timeout_sec": args.timeout_sec.unwrap_or(120), "budget": args.budget.unwrap_or(0.0)});
    }
    if let Some(f) = &args.desired_format {
        body["desired_format"] = json!(f);
    }
    if let Some(m) = args.max_attempts {
        body["max_attempts"] = json!(m);
    }
    if let Some(p) = args.priority {
        body["priority"] = json!(p);
    }
    if let Some(d) = args.delay_ms {
        body["delay_ms"] = json!(d);
    }
    if let Some(k) = &args.idempotency_key {
        body["idempotency_key"] = json!(k);
    }
    body
}

/// The tasks of a `.jsonl` file, each with the options' fields where the line names none.
fn read_lines(args: &SubmitArgs, path: &PathBuf) -> Result<Vec<Value>, Failure> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::new(exit::USAGE, format!("reading {}: {e}", path.display())))?;
    let mut bodies = Vec::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let bad = |why: String| Failure::new(exit::USAGE, format!("{}:{}: {why}", path.display(), n + 1));
        let body = match serde_json::from_str::<Value>(line).map_err(|e| bad(e.to_string()))? {
            Value::String(prompt) => task_body(args, prompt),
            Value::Object(fields) => {
                let mut body = task_body(args, String::new());
                body.as_object_mut().expect("a task body is an object").extend(fields);
                body
            }
            _ => return Err(bad("expected a JSON object or string".into())),
        };
        bodies.push(body);
    }
    Ok(bodies)
}

/// Most tasks of one batch request (the API's limit).
const BATCH: usize = 1000;

/// Creates the tasks through the batch route, 1,000 per request, printing each id.
async fn create_batches(api: &Client, bodies: &[Value], ids_on_stdout: bool) -> Result<Vec<Submitted>, Failure> {
    let mut submitted = Vec::with_capacity(bodies.len());
    for chunk in bodies.chunks(BATCH) {
        let answer = api.post("/api/runtime/llm-tasks/batch", &json!({ "tasks": chunk })).await.map_err(|f| {
            let total = bodies.len();
            Failure::new(f.code, format!("{} (after {} of {total} tasks were submitted)", f.message, submitted.len()))
        })?;
        for task in answer["tasks"].as_array().into_iter().flatten() {
            submitted.push(Submitted::announce(task, ids_on_stdout));
        }
    }
    Ok(submitted)
}

/// Creates `count` tasks, printing each id as it is created: on stdout when the ids are
/// the command's output, else on stderr. A failure names how many were created.
async fn create(api: &Client, body: &Value, count: u32, ids_on_stdout: bool) -> Result<Vec<Submitted>, Failure> {
    let mut submitted = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let task = api.post("/api/runtime/llm-tasks", body).await.map_err(|f| {
            Failure::new(f.code, format!("{} (after {} of {count} tasks were submitted)", f.message, submitted.len()))
        })?;
        submitted.push(Submitted::announce(&task, ids_on_stdout));
    }
    Ok(submitted)
}

fn oldest(tasks: &[Submitted]) -> i64 {
    tasks.iter().map(|t| t.created_at).min().unwrap_or(0)
}

fn is_finished(task: &Value) -> bool {
    matches!(task["status"].as_str(), Some("completed" | "failed" | "dead"))
}

/// Polls until every task is finished; answers them in submission order.
async fn wait(api: &Client, submitted: &[Submitted], deadline: Instant, progress: bool) -> Result<Vec<Value>, Failure> {
    let mut pending: HashMap<&str, i64> = submitted.iter().map(|s| (s.id.as_str(), s.created_at)).collect();
    let mut finished: HashMap<String, Value> = HashMap::new();
    let mut pause = POLL_MIN;
    loop {
        let oldest_pending = pending.values().copied().min().unwrap_or(0);
        for task in list_down_to(api, "/api/runtime/llm-tasks", TASK_PAGE, oldest_pending).await? {
            let Some(id) = task["id"].as_str() else { continue };
            if is_finished(&task) && pending.remove(id).is_some() {
                finished.insert(id.to_owned(), task);
            }
        }
        if progress {
            eprint!("\r{}/{} tasks finished", finished.len(), submitted.len());
        }
        if pending.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            if progress {
                eprintln!();
            }
            let n = submitted.len();
            return Err(Failure::new(exit::TIMEOUT, format!("{} of {n} tasks unfinished", pending.len())));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(POLL_MAX);
    }
    if progress {
        eprintln!();
    }
    Ok(submitted.iter().filter_map(|s| finished.remove(&s.id)).collect())
}

/// The rows of a list endpoint sorted newest first by `created_at`, from the newest
/// down to the first page reaching back to `oldest` (epoch ms).
async fn list_down_to(api: &Client, path: &str, limit: u32, oldest: i64) -> Result<Vec<Value>, Failure> {
    let mut rows = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let after = cursor.as_deref().map(|c| format!("&cursor={}", bloom::membridge::encode(c))).unwrap_or_default();
        let page = api.get_page(&format!("{path}?limit={limit}{after}")).await?;
        let reached = match page.rows.last() {
            Some(last) => last["created_at"].as_i64().unwrap_or(0) < oldest,
            None => true,
        };
        rows.extend(page.rows);
        match page.next {
            Some(next) if !reached => cursor = Some(next),
            _ => return Ok(rows),
        }
    }
}

/// The output of each task that has one, by task id: the content of its newest
/// artifact (an error result's artifact has none).
async fn outputs(api: &Client, tasks: &[Value], oldest: i64) -> Result<HashMap<String, String>, Failure> {
    let wanted: std::collections::HashSet<&str> = tasks.iter().filter_map(|t| t["id"].as_str()).collect();
    let mut outputs = HashMap::new();
    let mut seen = std::collections::HashSet::new();
    // Artifacts are created after their task, so the pages down to the oldest task hold
    // them all; newest first, so the first one of a task is its latest.
    for artifact in list_down_to(api, "/api/runtime/artifacts", ARTIFACT_PAGE, oldest).await? {
        let Some(task) = artifact["task_id"].as_str().filter(|t| wanted.contains(t)) else { continue };
        if !seen.insert(task.to_owned()) {
            continue;
        }
        if let Some(content) = artifact_content(api, &artifact).await? {
            outputs.insert(task.to_owned(), content);
        }
    }
    Ok(outputs)
}

/// Why a task did not complete: the error message of its latest result, or for a task
/// that died without one, that it ran out of attempts.
async fn error_of(api: &Client, task: &Value) -> Result<Option<String>, Failure> {
    let Some(id) = task["id"].as_str() else { return Ok(None) };
    let results = api.get(&format!("/api/runtime/llm-tasks/{}/results", bloom::membridge::encode(id))).await?;
    let message = results.get(0).and_then(|r| r["error_message"].as_str()).map(str::to_owned);
    Ok(message.or_else(|| (task["status"] == "dead").then(|| "no result: every attempt's lease expired".to_owned())))
}

/// Inline content as listed, S3-stored content through the content route.
async fn artifact_content(api: &Client, artifact: &Value) -> Result<Option<String>, Failure> {
    if let Some(content) = artifact["content"].as_str() {
        return Ok(Some(content.to_owned()));
    }
    match (artifact["url"].as_str(), artifact["id"].as_str()) {
        (Some(_), Some(id)) => {
            let path = format!("/api/runtime/artifacts/{}/content", bloom::membridge::encode(id));
            api.get_text(&path).await.map(Some)
        }
        _ => Ok(None),
    }
}

fn print_results(out: &[Value], json_out: bool) {
    if json_out {
        println!("{}", serde_json::to_string_pretty(out).unwrap_or_default());
    } else if let [o] = out {
        eprintln!("{} {}", o["id"].as_str().unwrap_or_default(), o["status"].as_str().unwrap_or_default());
        if let Some(error) = o["error"].as_str() {
            eprintln!("error: {error}");
        }
        println!("{}", o["output"].as_str().unwrap_or_default());
    } else {
        let columns = [
            ("ID", "/id"),
            ("STATUS", "/status"),
            ("ATTEMPTS", "/attempts"),
            ("OUTPUT", "/output"),
            ("ERROR", "/error"),
        ];
        print!("{}", table::render(out, &columns));
    }
}
