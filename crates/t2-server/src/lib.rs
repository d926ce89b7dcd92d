//! t2-server: the OpenAI-compatible HTTP front end. Handlers are thin: they parse and validate
//! ([`request`]), hand the request to the generation facade ([`infer`], which submits to the scheduler
//! that owns the model thread), and render what comes back ([`render`], [`stream`]). Nothing here runs
//! model work on the async runtime.

pub mod completions;
pub mod error;
pub mod expert_admin;
pub mod fewshot_jobs;
pub mod infer;
pub mod info;
pub mod metrics;
pub mod mix_choice;
pub mod openai;
pub mod render;
pub mod request;
pub mod state;
pub mod stream;
pub mod structure;
pub mod tracker;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Router;
use t2_engine::{Engine, EngineConfig, GenRequest, MemoryPlan, Scheduler, SeqEvent, Submission};
use tower_http::request_id::{
    MakeRequestUuid, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};

use crate::error::ApiError;
use crate::request::BodyLimit;
pub use crate::state::{AppState, Core, ServerConfig};

pub fn router(state: Arc<AppState>) -> Router {
    let protected = Router::new()
        .route("/v1/chat/completions", post(completions::chat_completions))
        .route("/v1/completions", post(completions::completions))
        .route("/v1/models", get(info::models))
        .route("/v1/experts", get(info::experts).post(expert_admin::upload))
        .route("/v1/experts/{name}", delete(expert_admin::remove))
        .route(
            "/v1/adaptations",
            post(fewshot_jobs::create).get(fewshot_jobs::list),
        )
        .route(
            "/v1/adaptations/{id}",
            get(fewshot_jobs::get).merge(delete(fewshot_jobs::cancel)),
        )
        .route("/openapi.json", get(info::openapi_json))
        .route("/docs", get(info::docs))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_api_key,
        ));
    let open = Router::new()
        .route("/health", get(info::health))
        .route("/ready", get(info::ready))
        .route("/metrics", get(info::metrics));
    let limit = state.cfg.max_body_bytes;
    protected
        .merge(open)
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::Extension(BodyLimit(limit)))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .with_state(state)
}

async fn not_found(req: Request) -> ApiError {
    ApiError::NotFound(format!(
        "no route for {} {}",
        req.method(),
        req.uri().path()
    ))
}

/// Bearer-token check with a constant-time comparison (every key is compared in full). Admin keys are
/// accepted too: they may do everything a plain key may.
async fn require_api_key(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if state.cfg.api_keys.is_empty() {
        return next.run(req).await;
    }
    let Some(given) = bearer(req.headers()) else {
        return ApiError::Unauthorized(
            "missing API key: send 'Authorization: Bearer <key>'".into(),
        )
        .into_response();
    };
    if !key_in(&state.cfg.api_keys, given) && !key_in(&state.cfg.admin_keys, given) {
        return ApiError::Unauthorized("invalid API key".into()).into_response();
    }
    next.run(req).await
}

/// The Bearer token of a request, if it sends one.
pub(crate) fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// Whether `given` is one of `keys`, comparing each in constant time.
pub(crate) fn key_in(keys: &[String], given: &str) -> bool {
    keys.iter().fold(false, |acc, k| {
        acc | constant_time_eq(k.as_bytes(), given.as_bytes())
    })
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Counts requests by route and status and logs each one with its request id.
async fn observe(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let id = req
        .extensions()
        .get::<RequestId>()
        .and_then(|r| r.header_value().to_str().ok())
        .unwrap_or("-")
        .to_string();
    let method = req.method().clone();
    let t0 = Instant::now();
    let resp = next.run(req).await;
    let status = resp.status();
    state
        .metrics
        .requests
        .with_label_values(&[route.as_str(), status.as_str()])
        .inc();
    tracing::info!(request_id = %id, %method, route = %route, status = status.as_u16(),
        ms = t0.elapsed().as_millis() as u64, "request");
    resp
}

/// Loads the model (on a blocking thread), starts the scheduler and runs one tiny request through it.
fn load(state: &AppState, engine_cfg: &EngineConfig) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let engine = Arc::new(Engine::open(engine_cfg)?);
    if let Some(f) = state.cfg.after_load {
        f();
    }
    let mut sched_cfg = state.cfg.scheduler.clone();
    let per_token = t2_model::kv::bytes_per_token(&engine.loaded.model.cfg, engine_cfg.dtype);
    let kv_bytes = match t2_model::device_memory(&engine_cfg.device) {
        Some((free, total)) if state.cfg.kv_memory_from_device => {
            let plan = MemoryPlan::new(&engine, free, total, &sched_cfg);
            tracing::info!("{plan}");
            eprintln!("{plan}");
            plan.kv
        }
        _ => state.cfg.kv_memory_bytes,
    };
    sched_cfg.kv_budget_tokens = (kv_bytes / per_token.max(1)).max(1);
    tracing::info!(
        kv_budget_tokens = sched_cfg.kv_budget_tokens,
        experts = engine
            .experts
            .as_ref()
            .map(|s| s.names().len())
            .unwrap_or(0),
        released_mb = engine.released_bytes / 1_000_000,
        "model loaded in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    // The base model holds one slot of the mix table; the others are what vLLM calls max_lora.
    state.metrics.set_served_model(
        &engine.loaded.model_id,
        engine_cfg.mix_capacity.saturating_sub(1),
    );
    let scheduler = Arc::new(Scheduler::start(engine.clone(), sched_cfg));
    let warm = engine.encode_chat(&[t2_model::ChatMessage::new("user", "Hi")])?;
    let mut h = scheduler
        .submit(Submission::new(
            t2_engine::Adaptation::base(),
            vec![GenRequest::new(warm, 2, Default::default())],
        ))
        .map_err(|e| anyhow::anyhow!("warm-up: {e}"))?;
    while let Some(ev) = h[0].events.blocking_recv() {
        match ev {
            SeqEvent::Token(t) if t.finish.is_some() => break,
            SeqEvent::Failed(m) => anyhow::bail!("warm-up failed: {m}"),
            _ => {}
        }
    }
    let router = crate::mix_choice::router_state(&engine, None);
    if let (Err(why), crate::mix_choice::DefaultStrategy::Route(_)) =
        (&router, &state.cfg.default_strategy)
    {
        anyhow::bail!("the default adaptation routes requests, but routing is unavailable: {why}");
    }
    let jobs = fewshot_jobs::Jobs::start(engine.clone(), scheduler.clone());
    state.set_core(Core::new(engine, scheduler, jobs, router));
    state.set_warm();
    Ok(())
}

/// Binds, logs `listening on http://ADDR`, loads the model in the background (/health answers at once,
/// /ready once the model is warm), and serves until SIGINT/SIGTERM; then stops accepting, lets in-flight
/// requests finish up to the shutdown timeout, and stops the model thread.
pub async fn serve(cfg: ServerConfig, engine_cfg: EngineConfig) -> anyhow::Result<()> {
    let addr: SocketAddr = format!("{}:{}", cfg.host, cfg.port)
        .parse()
        .map_err(|e| anyhow::anyhow!("bad listen address {}:{}: {e}", cfg.host, cfg.port))?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
    let local = listener.local_addr()?;
    eprintln!("t2 serve: listening on http://{local}");
    let state = Arc::new(AppState::new(cfg));
    let (fail_tx, mut fail_rx) = tokio::sync::mpsc::channel::<anyhow::Error>(1);
    {
        let state = state.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = load(&state, &engine_cfg) {
                let _ = fail_tx.blocking_send(e);
            } else {
                eprintln!("t2 serve: ready");
            }
        });
    }
    let app = router(state.clone());
    let shutdown_state = state.clone();
    let (load_err_tx, load_err_rx) = tokio::sync::oneshot::channel::<anyhow::Error>();
    let signal = async move {
        tokio::select! {
            _ = shutdown_signal() => {}
            Some(e) = fail_rx.recv() => { let _ = load_err_tx.send(e); }
        }
        shutdown_state.begin_shutdown();
        let timeout = shutdown_state.cfg.shutdown_timeout;
        eprintln!(
            "t2 serve: shutting down (finishing in-flight requests, up to {} s)",
            timeout.as_secs()
        );
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            eprintln!("t2 serve: shutdown deadline reached; exiting with requests still in flight");
            std::process::exit(1);
        });
    };
    axum::serve(listener, app)
        .with_graceful_shutdown(signal)
        .await?;
    let mut load_err_rx = load_err_rx;
    if let Ok(e) = load_err_rx.try_recv() {
        return Err(e);
    }
    if let Some(core) = state.core_if_loaded() {
        core.jobs.close();
        let sched = &core.scheduler;
        tokio::task::block_in_place(|| sched.join());
    }
    eprintln!("t2 serve: stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
