//! Process metrics in the Prometheus text format.
//!
//! One [`Metrics`] value per process, shared by `Arc`; every binary serves it at
//! `/metrics`. Counters and histograms are lock-free atomics.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// A monotonically increasing counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A monotonically increasing sum of fractional amounts (a cost in USD).
#[derive(Debug, Default)]
pub struct Sum(AtomicU64);

impl Sum {
    /// Adds `v` (negative and non-finite amounts are ignored).
    pub fn add(&self, v: f64) {
        if !(v.is_finite() && v > 0.0) {
            return;
        }
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| Some((f64::from_bits(bits) + v).to_bits()));
    }
    /// The current value.
    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
}

/// A gauge holding the last value set.
#[derive(Debug, Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    /// Sets the value.
    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }
    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Upper bounds (seconds) of the latency histogram buckets.
const BUCKETS: [f64; 16] =
    [0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0, 600.0];

/// A latency histogram with fixed buckets.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    /// Records one observation in seconds.
    pub fn observe(&self, seconds: f64) {
        let seconds = seconds.max(0.0);
        if let Some(i) = BUCKETS.iter().position(|b| seconds <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (b, n) in BUCKETS.iter().zip(&self.buckets) {
            cumulative += n.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
        }
        let count = self.count();
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {count}");
    }
}

/// `field: Kind = "help"` exports `bloom_<field>`; `field: Kind as "name" = "help"`
/// exports `bloom_<name>` (a Prometheus name that differs from the field's).
macro_rules! metrics {
    ($( $field:ident : $kind:ident $(as $name:literal)? = $help:literal ),* $(,)?) => {
        /// Every metric the runtime exports. Each binary moves the ones that concern it.
        #[derive(Debug, Default)]
        pub struct Metrics {
            $( #[doc = $help] pub $field: $kind, )*
        }

        impl Metrics {
            /// Renders all metrics in the Prometheus text exposition format.
            pub fn render(&self) -> String {
                let mut out = String::new();
                $( render_one(&mut out, metrics!(@name $field $($name)?), $help, &self.$field); )*
                out
            }
        }
    };
    (@name $field:ident) => { concat!("bloom_", stringify!($field)) };
    (@name $field:ident $name:literal) => { concat!("bloom_", $name) };
}

trait Render {
    fn render_into(&self, out: &mut String, name: &str, help: &str);
}

impl Render for Counter {
    fn render_into(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}", self.get());
    }
}

impl Render for Sum {
    fn render_into(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}", self.get());
    }
}

impl Render for Gauge {
    fn render_into(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {}", self.get());
    }
}

impl Render for Histogram {
    fn render_into(&self, out: &mut String, name: &str, help: &str) {
        self.render(out, name, help);
    }
}

fn render_one(out: &mut String, name: &str, help: &str, m: &dyn Render) {
    m.render_into(out, name, help);
}

metrics! {
    http_requests_total: Counter = "HTTP requests served.",
    http_request_errors_total: Counter = "HTTP requests answered with a 5xx status.",
    http_request_duration_seconds: Histogram = "HTTP request latency.",
    tasks_submitted_total: Counter = "Tasks created over REST.",
    tasks_cancelled_total: Counter = "Tasks cancelled over REST.",
    tasks_published: Counter as "tasks_published_total" = "Task dispatches acknowledged by JetStream.",
    outbox_publish_failures: Counter as "outbox_publish_failures_total" = "Task dispatch publishes that failed or were not acknowledged.",
    outbox_rows_deleted: Counter as "outbox_rows_deleted_total" = "Outbox rows deleted after JetStream acknowledged them.",
    outbox_rows_relayed: Counter as "outbox_rows_relayed_total" = "Outbox rows republished by the relay.",
    outbox_backlog: Gauge = "Outbox rows not yet acknowledged by JetStream (last relay pass).",
    claims_granted_total: Counter = "Claims that created a lease.",
    claims_refused_total: Counter = "Claims refused because the dispatch was not current.",
    claims_full_total: Counter = "Claims refused because the worker had no free slot in Postgres.",
    claims_retried_total: Counter = "Claim requests sent again after no reconciler answered in time (also: through the queue group after the worker's replica did not answer).",
    results_streamed_total: Counter = "Result batches a worker published to the results stream: their request found no reconciler, none stored it in time, or it was too large for one.",
    dispatch_latency_seconds: Histogram = "Time from task submission to its claim.",
    heartbeats_total: Counter = "Lease heartbeats renewed.",
    heartbeats_lost_total: Counter = "Lease heartbeats for leases that were no longer current.",
    results_completed_total: Counter = "Results that completed their task.",
    results_late_total: Counter = "Results for leases that were no longer current.",
    results_retried_total: Counter = "Failed runs whose task was put back to be tried again (a retryable class, a provider rate limit).",
    llm_cost_usd_total: Sum = "Cost of the recorded runs in USD, as they reported it.",
    llm_input_tokens_total: Counter = "Input tokens of the recorded runs.",
    llm_output_tokens_total: Counter = "Output tokens of the recorded runs.",
    llm_cache_read_tokens_total: Counter = "Input tokens the recorded runs read from the prompt cache.",
    llm_cache_creation_tokens_total: Counter = "Input tokens the recorded runs wrote to the prompt cache.",
    results_rejected_total: Counter = "Malformed result messages terminated.",
    results_refused_total: Counter = "Result messages terminated after Postgres refused them on every delivery.",
    task_duration_seconds: Histogram = "Execution time of tasks as reported by workers.",
    leases_expired_total: Counter = "Leases expired by the sweeper.",
    sweeps_paused_total: Counter = "Sweeps that expired nothing because the heartbeat path was broken less than a quiet window ago.",
    tasks_requeued_total: Counter = "Tasks requeued after a lease expiry.",
    tasks_dead_total: Counter = "Tasks that ran out of attempts.",
    tasks_rerouted_total: Counter = "Queued tasks moved from an offline worker to the pool.",
    tasks_due_total: Counter = "Delayed tasks dispatched when their not_before came.",
    tasks_delayed: Gauge = "Delayed tasks waiting for their not_before (last pass of the due duty).",
    idempotency_keys_forgotten_total: Counter = "Idempotency keys deleted after the retention window.",
    tasks_redispatched_total: Counter = "Queued tasks dispatched again: their dispatch went unclaimed while workers had room.",
    workers_marked_offline_total: Counter = "Workers marked offline for silence.",
    redeliveries_total: Counter = "Task messages delivered more than once.",
    s3_fallbacks_total: Counter = "Artifacts stored in Postgres because S3 failed.",
    artifacts_written_behind_total: Counter = "Outputs stored in Postgres at completion for the artifact mover to upload to S3.",
    artifacts_moved_total: Counter = "Artifacts whose content was moved from Postgres to S3.",
    artifact_moves_failed_total: Counter = "Uploads of artifacts kept in Postgres that failed (retried later).",
    artifacts_inline_backlog: Gauge = "Artifacts whose content is in Postgres while S3 is configured (last move pass).",
    agent_dispatches_total: Counter = "Tasks sent to HTTP agents.",
    agent_dispatch_failures_total: Counter = "Tasks an HTTP agent refused, or that never reached it (the attempt is abandoned).",
    membridge_sync_runs_total: Counter = "Membridge agent syncs completed.",
    membridge_sync_errors_total: Counter = "Membridge agent syncs that failed.",
    leader_changes_total: Counter = "Times this process gained or lost leadership.",
    is_leader: Gauge = "1 while this process is the elected leader.",
    executions_total: Counter = "Tasks executed by this worker.",
    executions_cancelled_total: Counter = "Executions this worker stopped because their task was cancelled.",
    executions_failed_total: Counter = "Executions that produced an error result.",
    in_flight: Gauge = "Tasks executing in this worker now.",
    malformed_messages_total: Counter = "NATS messages rejected as malformed.",
}

impl Metrics {
    /// Counts a recorded run: what it used, and whether its task was put back to be
    /// tried again.
    pub fn record_run(&self, run: &crate::domain::Metrics, retried: bool) {
        let u = &run.usage;
        self.llm_cost_usd_total.add(u.total_cost_usd.unwrap_or(0.0));
        let count = |c: &Counter, n: Option<i64>| c.add(n.unwrap_or(0).max(0) as u64);
        count(&self.llm_input_tokens_total, u.input_tokens);
        count(&self.llm_output_tokens_total, u.output_tokens);
        count(&self.llm_cache_read_tokens_total, u.cache_read_input_tokens);
        count(&self.llm_cache_creation_tokens_total, u.cache_creation_input_tokens);
        if retried {
            self.results_retried_total.inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_cumulative_buckets() {
        let m = Metrics::default();
        m.tasks_submitted_total.add(3);
        m.dispatch_latency_seconds.observe(0.0007);
        m.dispatch_latency_seconds.observe(0.003);
        let text = m.render();
        assert!(text.contains("bloom_tasks_submitted_total 3"));
        assert!(text.contains("bloom_dispatch_latency_seconds_bucket{le=\"0.001\"} 1"));
        assert!(text.contains("bloom_dispatch_latency_seconds_bucket{le=\"0.005\"} 2"));
        assert!(text.contains("bloom_dispatch_latency_seconds_count 2"));
    }

    /// Prometheus conventions: every counter ends in `_total`; durations are in seconds.
    #[test]
    fn names_follow_prometheus_conventions() {
        let text = Metrics::default().render();
        let types: Vec<(&str, &str)> =
            text.lines().filter_map(|l| l.strip_prefix("# TYPE ")).filter_map(|l| l.split_once(' ')).collect();
        assert!(types.len() > 30, "{text}");
        for (name, kind) in types {
            assert!(!name.contains("_ms") && !name.ends_with("_millis"), "{name} is not in base units");
            if kind == "counter" {
                assert!(name.ends_with("_total"), "counter {name} does not end in _total");
            } else {
                assert!(!name.ends_with("_total"), "{kind} {name} ends in _total");
            }
        }
        assert!(text.contains("bloom_tasks_published_total 0"));
    }
}
