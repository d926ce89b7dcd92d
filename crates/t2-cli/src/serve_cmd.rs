//! `t2 serve`: the OpenAI-compatible server on the default (or given) model and its experts.

use std::time::Duration;

use anyhow::{bail, Result};
use clap::Args;
use t2_engine::SchedulerConfig;
use t2_server::mix_choice::DefaultStrategy;
use t2_server::ServerConfig;

use crate::common::{engine_config, ModelArgs, SvfArgs};

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub svf: SvfArgs,
    /// Serve random weights of a known shape (llama-3.2-1b, llama-3-8b) with the model's tokenizer and
    /// four random experts: for speed measurements only
    #[arg(long)]
    pub random: Option<String>,
    /// Address to listen on
    #[arg(long, default_value = "127.0.0.1", env = "T2_HOST")]
    pub host: String,
    /// Port (0: any free port; the bound address is logged)
    #[arg(long, default_value_t = 8080, env = "T2_PORT")]
    pub port: u16,
    /// API key clients must send as 'Authorization: Bearer KEY' (repeat or comma-separate for several)
    #[arg(
        long = "api-key",
        env = "T2_API_KEY",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub api_keys: Vec<String>,
    /// Admin key for changing experts while serving (`POST /v1/experts`, `DELETE /v1/experts/NAME`);
    /// it is accepted wherever an API key is. Without one, experts cannot be changed over HTTP.
    #[arg(
        long = "admin-key",
        env = "T2_ADMIN_KEY",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub admin_keys: Vec<String>,
    /// Largest expert file `POST /v1/experts` takes, in bytes; larger gets 413
    #[arg(long, default_value_t = 64 << 20)]
    pub max_expert_bytes: usize,
    /// Sequences decoded together at most
    #[arg(long, default_value_t = 32)]
    pub max_batch: usize,
    /// Input tokens per batch step at most (longer prompts are prefilled in chunks)
    #[arg(long, default_value_t = 512)]
    pub max_batched_tokens: usize,
    /// Prompt tokens per batch step at most while other requests are decoding: each step delays every
    /// running stream's next token, so smaller chunks keep inter-token latency down while prompts arrive
    #[arg(long, default_value_t = 32)]
    pub max_prefill_while_decoding: usize,
    /// Requests waiting for admission at most; more get 429
    #[arg(long, default_value_t = 64)]
    pub max_queue: usize,
    /// KV cache memory for running sequences, in MiB (each reserves prompt + max_tokens) [default: 2048
    /// on CPU; on a GPU, 90% of the device memory left once the model, factors and mix table are loaded]
    #[arg(long)]
    pub kv_memory_mb: Option<usize>,
    /// Largest n (choices per request)
    #[arg(long, default_value_t = 8)]
    pub max_n: usize,
    /// Largest request body in bytes; larger gets 413
    #[arg(long, default_value_t = 2 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// A request that has not finished after this many seconds is cancelled
    #[arg(long, default_value_t = 600)]
    pub request_timeout_s: u64,
    /// On SIGTERM/SIGINT, how long in-flight requests may take to finish
    #[arg(long, default_value_t = 30)]
    pub shutdown_timeout_s: u64,
    /// max_tokens for requests that give none (capped by the context left)
    #[arg(long, default_value_t = 512)]
    pub default_max_tokens: usize,
    /// What the plain model id means: none, auto, prompt, classifier, expert:NAME or profile:NAME
    #[arg(long, default_value = "none")]
    pub default_adaptation: String,
    /// What `<model>:auto` routes with: classifier (the classifier expert; prompt routing when none is
    /// loaded) or prompt (the base model scores the labels)
    #[arg(long, default_value = "classifier", value_parser = ["classifier", "prompt"])]
    pub auto_strategy: String,
    /// Routing policy when a request gives none: hard (the top label's expert) or soft (α = label
    /// probabilities)
    #[arg(long, default_value = "hard", value_parser = ["hard", "soft"])]
    pub route_policy: String,
    /// Top-label probability under which routing falls back to the base model (0 to 1)
    #[arg(long, default_value_t = 0.0)]
    pub route_threshold: f32,
    /// Mixes registered at once (each costs a row of scales per matrix)
    #[arg(long, default_value_t = 64)]
    pub mix_capacity: usize,
    /// Build merged weights for a mix after it has had the batch to itself for this many steps (0: never).
    /// On CPU a merge costs seconds of both cores, so it only pays off for long single-mix runs.
    #[arg(long, default_value_t = 512)]
    pub merge_after_steps: usize,
    /// Do not keep prompts' KV blocks for later prompts that start the same way (automatic prefix caching
    /// is on by default)
    #[arg(long)]
    pub no_prefix_cache: bool,
}

pub fn run(a: ServeArgs) -> Result<()> {
    let path = a.model.model_path();
    if !path.exists() {
        bail!(
            "model file not found: {} (run `bash scripts/fetch-model.sh` to fetch the default model, or pass --model PATH)",
            path.display()
        );
    }
    let default_strategy: DefaultStrategy = a
        .default_adaptation
        .parse()
        .map_err(|e: String| anyhow::anyhow!(e))?;
    if !(a.route_threshold.is_finite() && (0.0..=1.0).contains(&a.route_threshold)) {
        bail!(
            "--route-threshold must be between 0 and 1, got {}",
            a.route_threshold
        );
    }
    for (name, v) in [
        ("--max-batch", a.max_batch),
        ("--max-batched-tokens", a.max_batched_tokens),
        ("--max-prefill-while-decoding", a.max_prefill_while_decoding),
        ("--max-queue", a.max_queue),
        ("--kv-memory-mb", a.kv_memory_mb.unwrap_or(1)),
        ("--max-n", a.max_n),
        ("--default-max-tokens", a.default_max_tokens),
        ("--request-timeout-s", a.request_timeout_s as usize),
    ] {
        if v == 0 {
            bail!("{name} must be at least 1");
        }
    }
    if a.mix_capacity < 2 {
        bail!("--mix-capacity must be at least 2 (the base model and one mix)");
    }
    if a.api_keys.iter().any(|k| k.trim().is_empty()) {
        bail!("--api-key must not be empty");
    }
    if a.admin_keys.iter().any(|k| k.trim().is_empty()) {
        bail!("--admin-key must not be empty");
    }
    if a.admin_keys.iter().any(|k| a.api_keys.contains(k)) {
        bail!("an --admin-key must differ from every --api-key");
    }
    let mut engine_cfg = engine_config(&a.model, &a.svf, true)?;
    engine_cfg.mix_capacity = a.mix_capacity;
    // A server only multiplies: the packed copies serve every product, so it holds each weight once.
    engine_cfg.release_dense = true;
    if let Some(shape) = &a.random {
        let Some(cfg) = t2_model::LlamaConfig::named(shape) else {
            bail!(
                "unknown random shape '{shape}' (known: {})",
                t2_model::LlamaConfig::NAMED
            );
        };
        engine_cfg.random_shape = Some((shape.clone(), cfg));
    }
    let cfg = ServerConfig {
        host: a.host,
        port: a.port,
        api_keys: a.api_keys,
        admin_keys: a.admin_keys,
        max_expert_bytes: a.max_expert_bytes,
        max_n: a.max_n,
        max_body_bytes: a.max_body_bytes,
        request_timeout: Duration::from_secs(a.request_timeout_s),
        shutdown_timeout: Duration::from_secs(a.shutdown_timeout_s),
        default_max_tokens: a.default_max_tokens,
        default_strategy,
        routing: t2_server::mix_choice::RoutingConfig {
            auto: a
                .auto_strategy
                .parse()
                .map_err(|e: String| anyhow::anyhow!(e))?,
            policy: t2_engine::RoutePolicy {
                soft: a.route_policy == "soft",
                threshold: a.route_threshold,
            },
        },
        scheduler: SchedulerConfig {
            max_batch: a.max_batch,
            max_batched_tokens: a.max_batched_tokens,
            max_prefill_while_decoding: a.max_prefill_while_decoding,
            max_queue: a.max_queue,
            kv_budget_tokens: 0, // set from kv_memory_bytes once the model is loaded
            merge_after_steps: (a.merge_after_steps > 0).then_some(a.merge_after_steps),
            prefix_cache: !a.no_prefix_cache,
        },
        kv_memory_bytes: a.kv_memory_mb.unwrap_or(2048) << 20,
        kv_memory_from_device: a.kv_memory_mb.is_none(),
        after_load: Some(crate::return_freed_memory),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("t2-http")
        .build()?;
    rt.block_on(t2_server::serve(cfg, engine_cfg))
}
