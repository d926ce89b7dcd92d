//! What every handler shares: configuration, metrics, and (once loaded) the engine and its scheduler.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use t2_engine::{Engine, Scheduler, SchedulerConfig};

use crate::error::{ApiError, ApiResult};
use crate::metrics::Metrics;
use crate::mix_choice::{Context, DefaultStrategy, RouterState, RoutingConfig};

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub host: String,
    /// 0 picks a free port (the bound address is logged).
    pub port: u16,
    /// Bearer keys accepted; empty: no authentication.
    pub api_keys: Vec<String>,
    /// Bearer keys that may also change the experts (`POST`/`DELETE /v1/experts`); they are accepted
    /// wherever an API key is. Empty: experts cannot be changed over HTTP.
    pub admin_keys: Vec<String>,
    /// Largest expert file `POST /v1/experts` takes; larger gets 413.
    pub max_expert_bytes: usize,
    pub max_n: usize,
    pub max_body_bytes: usize,
    pub request_timeout: Duration,
    pub shutdown_timeout: Duration,
    /// max_tokens when a request gives none (capped by the context left).
    pub default_max_tokens: usize,
    pub default_strategy: DefaultStrategy,
    pub routing: RoutingConfig,
    pub scheduler: SchedulerConfig,
    /// KV cache memory for running sequences; turned into `scheduler.kv_budget_tokens` once the model's
    /// per-token size is known.
    pub kv_memory_bytes: usize,
    /// On an accelerator, size the KV cache from the device's free memory instead (see `load`).
    pub kv_memory_from_device: bool,
    /// Run on the loading thread once the model is resident: the binary's allocator may hold on to what
    /// loading freed (the dense copies the engine released), and this hands it back to the OS.
    pub after_load: Option<fn()>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8080,
            api_keys: Vec::new(),
            admin_keys: Vec::new(),
            max_expert_bytes: 64 << 20,
            max_n: 8,
            max_body_bytes: 2 * 1024 * 1024,
            request_timeout: Duration::from_secs(600),
            shutdown_timeout: Duration::from_secs(30),
            default_max_tokens: 512,
            default_strategy: DefaultStrategy::None,
            routing: RoutingConfig::default(),
            scheduler: SchedulerConfig::default(),
            kv_memory_bytes: 2 << 30,
            kv_memory_from_device: false,
            after_load: None,
        }
    }
}

pub struct Core {
    pub engine: Arc<Engine>,
    pub scheduler: Arc<Scheduler>,
    /// Few-shot adaptation jobs (`/v1/adaptations`).
    pub jobs: crate::fewshot_jobs::Jobs,
    /// Pass-1 labels built from the loaded experts, or why routing is unavailable. Rebuilt when experts
    /// are added or removed; a request keeps the one it started with.
    router: RwLock<Arc<RouterState>>,
    /// Changes to the experts one at a time (the store's change and the router's rebuild together).
    pub expert_writes: Mutex<()>,
    /// The vocabulary for structured output, built on first use.
    vocabulary: std::sync::OnceLock<Result<Arc<t2_structured::Vocabulary>, String>>,
}

impl Core {
    pub fn new(
        engine: Arc<Engine>,
        scheduler: Arc<Scheduler>,
        jobs: crate::fewshot_jobs::Jobs,
        router: RouterState,
    ) -> Self {
        Self {
            engine,
            scheduler,
            jobs,
            router: RwLock::new(Arc::new(router)),
            expert_writes: Mutex::new(()),
            vocabulary: std::sync::OnceLock::new(),
        }
    }

    /// The model's vocabulary as grammars see it (tens of milliseconds the first time: call it off the
    /// async runtime).
    pub fn vocabulary(&self) -> Result<Arc<t2_structured::Vocabulary>, String> {
        self.vocabulary
            .get_or_init(|| {
                t2_structured::Vocabulary::new(&self.engine.loaded.tokenizer)
                    .map(Arc::new)
                    .map_err(|e| e.to_string())
            })
            .clone()
    }

    /// The router as it stands now.
    pub fn router(&self) -> Arc<RouterState> {
        self.router.read().expect("router lock").clone()
    }

    /// Rebuilds the router from the experts stored now (after an upload or a removal).
    pub fn rebuild_router(&self) {
        let fresh = crate::mix_choice::router_state(&self.engine, None);
        *self.router.write().expect("router lock") = Arc::new(fresh);
    }

    /// What adaptation choice needs from the core and the configuration.
    pub fn context<'a>(&'a self, cfg: &'a ServerConfig) -> Context<'a> {
        Context {
            engine: &self.engine,
            router: self.router(),
            default: &cfg.default_strategy,
            routing: &cfg.routing,
        }
    }
}

pub struct AppState {
    pub cfg: ServerConfig,
    pub metrics: Metrics,
    core: OnceLock<Core>,
    warm: AtomicBool,
    shutting_down: AtomicBool,
}

impl AppState {
    pub fn new(cfg: ServerConfig) -> Self {
        Self {
            cfg,
            metrics: Metrics::new(),
            core: OnceLock::new(),
            warm: AtomicBool::new(false),
            shutting_down: AtomicBool::new(false),
        }
    }

    pub fn set_core(&self, core: Core) {
        if self.core.set(core).is_err() {
            tracing::error!("the model was loaded twice; keeping the first");
        }
    }

    pub fn core_if_loaded(&self) -> Option<&Core> {
        self.core.get()
    }

    /// The loaded engine, or 503 while it loads or once shutdown began.
    pub fn core(&self) -> ApiResult<&Core> {
        if self.is_shutting_down() {
            return Err(ApiError::Unavailable("the server is shutting down".into()));
        }
        self.core.get().ok_or_else(|| {
            ApiError::Unavailable("the model is still loading; retry shortly".into())
        })
    }

    pub fn set_warm(&self) {
        self.warm.store(true, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.warm.load(Ordering::SeqCst) && !self.is_shutting_down()
    }

    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }
}
