//! Prometheus metrics. Label values are bounded: routes are the router's own paths, statuses are HTTP
//! codes, and adaptation labels are known experts and profiles (ad-hoc mixes count as "custom").

use std::sync::atomic::Ordering;

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};
use t2_engine::SchedulerStats;

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub ttft: Histogram,
    pub itl: Histogram,
    pub e2e: Histogram,
    pub queue_time: Histogram,
    pub prompt_tokens: IntCounter,
    pub generated_tokens: IntCounter,
    pub queue_depth: IntGauge,
    pub running: IntGauge,
    pub kv_used: IntGauge,
    pub kv_capacity: IntGauge,
    pub by_adaptation: IntCounterVec,
    pub cancellations: IntCounterVec,
    pub batch_steps: IntCounter,
    pub merges: IntCounter,
    pub routing_decisions: IntCounterVec,
    pub pass1_latency: Histogram,
    pub routing: IntGauge,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let latency = [
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
        ];
        let hist = |name: &str, help: &str, b: &[f64]| {
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(b.to_vec()))
                .expect("valid histogram");
            registry.register(Box::new(h.clone())).expect("unique");
            h
        };
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid counter");
            registry.register(Box::new(c.clone())).expect("unique");
            c
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid gauge");
            registry.register(Box::new(g.clone())).expect("unique");
            g
        };
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter");
            registry.register(Box::new(c.clone())).expect("unique");
            c
        };
        Self {
            requests: counter_vec(
                "t2_requests_total",
                "HTTP requests by route and status",
                &["route", "status"],
            ),
            ttft: hist(
                "t2_time_to_first_token_seconds",
                "From request arrival to the first generated token",
                &latency,
            ),
            itl: hist(
                "t2_inter_token_latency_seconds",
                "Between consecutive tokens of one sequence",
                &[
                    0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0,
                ],
            ),
            e2e: hist(
                "t2_request_duration_seconds",
                "Completion requests from arrival to the last token",
                &latency,
            ),
            queue_time: hist(
                "t2_queue_time_seconds",
                "Time a sequence waited for admission into the batch",
                &latency,
            ),
            prompt_tokens: counter("t2_prompt_tokens_total", "Prompt tokens admitted"),
            generated_tokens: counter("t2_generated_tokens_total", "Tokens generated"),
            queue_depth: gauge("t2_queue_depth", "Requests waiting for admission"),
            running: gauge("t2_running_sequences", "Sequences in the running batch"),
            kv_used: gauge(
                "t2_kv_cache_used_tokens",
                "KV cache tokens reserved by running sequences",
            ),
            kv_capacity: gauge("t2_kv_cache_capacity_tokens", "KV cache token budget"),
            by_adaptation: counter_vec(
                "t2_requests_by_adaptation_total",
                "Completion requests by adaptation (base, auto, expert or profile name, custom)",
                &["adaptation"],
            ),
            cancellations: counter_vec(
                "t2_cancellations_total",
                "Requests dropped before finishing, by reason",
                &["reason"],
            ),
            batch_steps: counter("t2_batch_steps_total", "Batched forward steps run"),
            merges: counter("t2_merges_total", "Mixes given merged weights"),
            routing_decisions: counter_vec(
                "t2_routing_decisions_total",
                "Pass-1 routing decisions by strategy and chosen label",
                &["strategy", "label"],
            ),
            pass1_latency: hist(
                "t2_pass1_seconds",
                "Pass 1 (scoring the request's category) from its admission to its decision",
                &[0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0],
            ),
            routing: gauge("t2_routing_sequences", "Pass-1 rows in the running batch"),
            registry,
        }
        .init_series()
    }

    /// Series that should exist (at zero) before anything happens, so dashboards and alerts see them.
    fn init_series(self) -> Self {
        for reason in ["disconnect", "timeout"] {
            self.cancellations.with_label_values(&[reason]);
        }
        self
    }

    /// Copies the scheduler's live counters into the gauges, then renders the text format.
    pub fn render(&self, stats: Option<&SchedulerStats>) -> String {
        if let Some(s) = stats {
            self.queue_depth
                .set(s.queue_depth.load(Ordering::Relaxed) as i64);
            self.running.set(s.running.load(Ordering::Relaxed) as i64);
            self.routing.set(s.routing.load(Ordering::Relaxed) as i64);
            self.kv_used
                .set(s.kv_used_tokens.load(Ordering::Relaxed) as i64);
            self.kv_capacity
                .set(s.kv_budget_tokens.load(Ordering::Relaxed) as i64);
            let steps = s.steps.load(Ordering::Relaxed);
            self.batch_steps
                .inc_by(steps.saturating_sub(self.batch_steps.get()));
            let merges = s.merges.load(Ordering::Relaxed);
            self.merges.inc_by(merges.saturating_sub(self.merges.get()));
        }
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding cannot fail");
        String::from_utf8(out).expect("prometheus text is utf-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
