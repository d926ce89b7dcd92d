//! Prometheus metrics. Label values are bounded: routes are the router's own paths, statuses are HTTP
//! codes, and adaptation labels are known experts and profiles (ad-hoc mixes count as "custom").
//!
//! Beside t2's own metrics, four aliases carry the names, types, units and labels of vLLM 0.10.1.1
//! (`vllm/v1/metrics/loggers.py`), because load balancers written for vLLM read exactly these: the
//! Gateway API Inference Extension's endpoint picker scores replicas by queue, running requests, KV use
//! and which adapters (here: experts and stored mixes, named by their model id `<base>:<name>`) are active.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};
use t2_engine::SchedulerStats;

/// Adaptation labels that name no adapter a client could ask for by model id.
const NOT_ADAPTERS: [&str; 3] = ["base", "auto", "custom"];

/// What the vLLM aliases need from the loaded model.
struct Served {
    model_name: String,
    /// vLLM's `max_lora`: adapters that can be in one batch, here the mix table's slots besides the base.
    max_adapters: usize,
}

/// Requests per adapter (model id), waiting for admission and admitted.
#[derive(Default)]
struct AdapterActivity {
    by_model: Mutex<BTreeMap<String, [usize; 2]>>,
}

const WAITING: usize = 0;
const RUNNING: usize = 1;

impl AdapterActivity {
    fn shift(&self, model: &str, from: Option<usize>, to: Option<usize>) {
        let mut map = self.by_model.lock().unwrap_or_else(|e| e.into_inner());
        let counts = map.entry(model.to_string()).or_default();
        if let Some(i) = from {
            counts[i] = counts[i].saturating_sub(1);
        }
        if let Some(i) = to {
            counts[i] += 1;
        }
        if counts == &[0, 0] {
            map.remove(model);
        }
    }

    /// Comma-separated model ids with waiting and with running requests, as vLLM joins adapter names.
    fn lists(&self) -> (String, String) {
        let map = self.by_model.lock().unwrap_or_else(|e| e.into_inner());
        let join = |i: usize| {
            map.iter()
                .filter(|(_, c)| c[i] > 0)
                .map(|(m, _)| m.as_str())
                .collect::<Vec<_>>()
                .join(",")
        };
        (join(WAITING), join(RUNNING))
    }
}

/// One request on a named adapter: waiting until `admitted`, running until dropped.
pub struct AdapterLease {
    activity: Arc<AdapterActivity>,
    model: String,
    state: usize,
}

impl AdapterLease {
    pub fn admitted(&mut self) {
        if self.state == WAITING {
            self.activity
                .shift(&self.model, Some(WAITING), Some(RUNNING));
            self.state = RUNNING;
        }
    }
}

impl Drop for AdapterLease {
    fn drop(&mut self) {
        self.activity.shift(&self.model, Some(self.state), None);
    }
}

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
    prefix_queries: IntCounter,
    prefix_hits: IntCounter,
    prefix_cached: IntGauge,
    pub routing_decisions: IntCounterVec,
    pub pass1_latency: Histogram,
    /// Time to work out one constrained row's allowed tokens (overlapped with the forward pass).
    pub mask_latency: Histogram,
    pub routing: IntGauge,
    vllm_running: GaugeVec,
    vllm_waiting: GaugeVec,
    vllm_kv_usage: GaugeVec,
    vllm_lora_info: GaugeVec,
    served: OnceLock<Served>,
    adapters: Arc<AdapterActivity>,
    /// Renders one at a time: the LoRA info gauge is cleared and refilled for each scrape.
    render_lock: Mutex<()>,
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
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            let g = GaugeVec::new(Opts::new(name, help), labels).expect("valid gauge");
            registry.register(Box::new(g.clone())).expect("unique");
            g
        };
        let per_engine = ["model_name", "engine"];
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
            prefix_queries: counter(
                "t2_prefix_cache_queries_total",
                "Prompt tokens of admitted sequences, looked up in the prefix cache",
            ),
            prefix_hits: counter(
                "t2_prefix_cache_hits_total",
                "Prompt tokens found in the prefix cache (same tokens before them, same weights): not computed again",
            ),
            prefix_cached: gauge(
                "t2_prefix_cache_tokens",
                "KV positions the prefix cache keeps (blocks no sequence reads count as free in t2_kv_cache_used_tokens)",
            ),
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
            mask_latency: hist(
                "t2_structured_mask_seconds",
                "Computing one constrained row's allowed next tokens (JSON schema, tool-call grammar); runs \
                 beside the step's forward pass",
                &[0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05],
            ),
            routing: gauge("t2_routing_sequences", "Pass-1 rows in the running batch"),
            vllm_running: gauge_vec(
                "vllm:num_requests_running",
                "vLLM-compatible alias: rows in the running batch (t2_running_sequences + t2_routing_sequences)",
                &per_engine,
            ),
            vllm_waiting: gauge_vec(
                "vllm:num_requests_waiting",
                "vLLM-compatible alias of t2_queue_depth: requests waiting for admission",
                &per_engine,
            ),
            vllm_kv_usage: gauge_vec(
                "vllm:kv_cache_usage_perc",
                "vLLM-compatible alias: KV cache use, 1 means 100 percent (t2_kv_cache_used_tokens / t2_kv_cache_capacity_tokens)",
                &per_engine,
            ),
            vllm_lora_info: gauge_vec(
                "vllm:lora_requests_info",
                "vLLM-compatible: experts and stored mixes (by model id) with waiting and running requests; the value is the time of the scrape",
                &["max_lora", "waiting_lora_adapters", "running_lora_adapters"],
            ),
            served: OnceLock::new(),
            adapters: Arc::default(),
            render_lock: Mutex::new(()),
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

    /// Names the served model for the vLLM aliases, once it is loaded; until then they are absent, as the
    /// server is not ready.
    pub fn set_served_model(&self, model_name: &str, max_adapters: usize) {
        let _ = self.served.set(Served {
            model_name: model_name.to_string(),
            max_adapters,
        });
    }

    /// Tracks one request on an expert or stored mix for `vllm:lora_requests_info`; None for the base
    /// model, `auto` (its mix is decided inside the request) and ad-hoc mixes, which no model id names.
    pub fn adapter_lease(&self, adaptation_label: &str) -> Option<AdapterLease> {
        if NOT_ADAPTERS.contains(&adaptation_label) {
            return None;
        }
        let served = self.served.get()?;
        let model = format!("{}:{adaptation_label}", served.model_name);
        self.adapters.shift(&model, None, Some(WAITING));
        Some(AdapterLease {
            activity: self.adapters.clone(),
            model,
            state: WAITING,
        })
    }

    /// Copies the scheduler's live counters into the gauges, then renders the text format.
    pub fn render(&self, stats: Option<&SchedulerStats>) -> String {
        let _one_at_a_time = self.render_lock.lock().unwrap_or_else(|e| e.into_inner());
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
            let q = s.prefix_query_tokens.load(Ordering::Relaxed);
            self.prefix_queries
                .inc_by(q.saturating_sub(self.prefix_queries.get()));
            let h = s.prefix_hit_tokens.load(Ordering::Relaxed);
            self.prefix_hits
                .inc_by(h.saturating_sub(self.prefix_hits.get()));
            self.prefix_cached
                .set(s.prefix_cached_tokens.load(Ordering::Relaxed) as i64);
            self.render_vllm_aliases();
        }
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding cannot fail");
        String::from_utf8(out).expect("prometheus text is utf-8")
    }
}

impl Metrics {
    /// Called after the t2 gauges are set, so the aliases show the same scrape's values.
    fn render_vllm_aliases(&self) {
        let Some(served) = self.served.get() else {
            return;
        };
        let engine = [served.model_name.as_str(), "0"];
        self.vllm_running
            .with_label_values(&engine)
            .set((self.running.get() + self.routing.get()) as f64);
        self.vllm_waiting
            .with_label_values(&engine)
            .set(self.queue_depth.get() as f64);
        let capacity = self.kv_capacity.get();
        let usage = if capacity > 0 {
            self.kv_used.get() as f64 / capacity as f64
        } else {
            0.0
        };
        self.vllm_kv_usage
            .with_label_values(&engine)
            .set(usage.clamp(0.0, 1.0));
        // vLLM leaves one series per label combination it has ever seen; one current series is what
        // its readers want (they take the newest timestamp), and keeps the label values bounded.
        let (waiting, running) = self.adapters.lists();
        let max_lora = served.max_adapters.to_string();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        self.vllm_lora_info.reset();
        self.vllm_lora_info
            .with_label_values(&[max_lora.as_str(), waiting.as_str(), running.as_str()])
            .set(now);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
