//! Read-only routes: models, experts, health, readiness, metrics, the OpenAPI document and its docs page.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use utoipa::OpenApi;

use crate::error::{ApiResult, ErrorBody};
use crate::openai::*;

use crate::state::{AppState, Core};

/// The base model, `:base`, `:auto`, one card per expert and per stored mix.
#[utoipa::path(get, path = "/v1/models", responses((status = 200, body = ModelList), (status = 401, body = ErrorBody), (status = 503, body = ErrorBody)), tag = "openai")]
pub async fn models(State(state): State<Arc<AppState>>) -> ApiResult<Json<ModelList>> {
    let core = state.core()?;
    let e = &core.engine;
    let base = e.loaded.model_id.clone();
    let ctx = e.context_length();
    let card = |id: String, adaptation: &str, parent: bool| ModelCard {
        id,
        object: "model",
        created: 0,
        owned_by: "t2",
        parent: parent.then(|| base.clone()),
        root: Some(base.clone()),
        adaptation: adaptation.into(),
        max_model_len: ctx,
    };
    let mut data = vec![
        card(base.clone(), "default", false),
        card(format!("{base}:base"), "none", true),
        card(format!("{base}:auto"), "auto", true),
    ];
    if let Some(store) = &e.experts {
        for name in store.names() {
            data.push(card(format!("{base}:{name}"), "expert", true));
        }
        for m in &store.mixes() {
            data.push(card(format!("{base}:{}", m.name), "profile", true));
        }
    }
    Ok(Json(ModelList {
        object: "list",
        data,
    }))
}

/// Every stored expert with what uses it now: requests holding it, sequences running with weights made
/// from it (held mix-table slots), and whether merged weights made from it exist.
pub fn expert_cards(core: &Core) -> Vec<ExpertCard> {
    let e = &core.engine;
    let (Some(store), Some(svf)) = (&e.experts, &e.svf) else {
        return Vec::new();
    };
    let base = &e.loaded.model_id;
    let slots = svf.slots();
    store
        .listing()
        .into_iter()
        .map(|x| {
            let name = &x.expert.meta.name;
            let mine = || slots.iter().filter(|s| s.key.uses(name, &x.digest));
            let sequences: usize = mine().map(|s| s.holders).sum();
            let requests = store.pinned(name);
            ExpertCard {
                name: name.clone(),
                description: x.expert.meta.description.clone(),
                category: x.expert.meta.category.clone(),
                targets: x.expert.meta.targets.to_string(),
                model: format!("{base}:{name}"),
                digest: x.digest.clone(),
                state: if sequences > 0 || requests > 0 {
                    ExpertState::InUse
                } else {
                    ExpertState::Loaded
                },
                requests,
                sequences,
                merged: mine().any(|s| s.merged),
            }
        })
        .collect()
}

/// The loaded experts (with what uses them now) and stored mixes.
#[utoipa::path(get, path = "/v1/experts", responses((status = 200, body = ExpertList), (status = 401, body = ErrorBody), (status = 503, body = ErrorBody)), tag = "t2")]
pub async fn experts(State(state): State<Arc<AppState>>) -> ApiResult<Json<ExpertList>> {
    let core = state.core()?;
    let base = &core.engine.loaded.model_id;
    let (data, mixes) = match &core.engine.experts {
        None => (Vec::new(), Vec::new()),
        Some(store) => (
            expert_cards(core),
            store
                .mixes()
                .iter()
                .map(|m| MixCard {
                    name: m.name.clone(),
                    alpha: m.mix.weights(),
                    description: m.description.clone(),
                    model: format!("{base}:{}", m.name),
                    provenance: m.provenance.clone(),
                })
                .collect(),
        ),
    };
    Ok(Json(ExpertList {
        object: "list",
        data,
        mixes,
    }))
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/health", responses((status = 200, body = Status)), tag = "ops")]
pub async fn health() -> Json<Status> {
    Json(Status { status: "ok" })
}

/// Readiness: the model is loaded and warm, and the server is not shutting down.
#[utoipa::path(get, path = "/ready", responses((status = 200, body = Status), (status = 503, body = Status)), tag = "ops")]
pub async fn ready(State(state): State<Arc<AppState>>) -> Response {
    if state.is_ready() {
        return Json(Status { status: "ready" }).into_response();
    }
    let status = if state.is_shutting_down() {
        "shutting_down"
    } else {
        "loading"
    };
    (StatusCode::SERVICE_UNAVAILABLE, Json(Status { status })).into_response()
}

/// Prometheus metrics in the text exposition format.
#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text format", content_type = "text/plain")), tag = "ops")]
pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let stats = state.core_if_loaded().map(|c| c.scheduler.stats().clone());
    let text = state.metrics.render(stats.as_deref());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

#[derive(OpenApi)]
#[openapi(
    info(title = "t2", description = "OpenAI-compatible Transformer² (self-adaptive LLM) server"),
    paths(
        crate::completions::chat_completions,
        crate::completions::completions,
        models,
        experts,
        health,
        ready,
        metrics,
        openapi_json,
        crate::fewshot_jobs::create,
        crate::fewshot_jobs::list,
        crate::fewshot_jobs::get,
        crate::fewshot_jobs::cancel,
        crate::expert_admin::upload,
        crate::expert_admin::remove,
    ),
    tags(
        (name = "openai", description = "OpenAI-compatible routes"),
        (name = "t2", description = "Transformer² extensions"),
        (name = "ops", description = "Health, readiness and metrics"),
    )
)]
pub struct ApiDoc;

/// This document.
#[utoipa::path(get, path = "/openapi.json", responses((status = 200, description = "OpenAPI 3 document", body = Object), (status = 401, body = ErrorBody)), tag = "ops")]
pub async fn openapi_json(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    Json(document(&state.cfg))
}

/// The OpenAPI document with the limits that this server's flags set (`n` at most `--max-n`).
pub fn document(cfg: &crate::state::ServerConfig) -> serde_json::Value {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).expect("the OpenAPI document serializes");
    if let Some(n) = doc.pointer_mut("/components/schemas/SamplingFields/properties/n") {
        n["maximum"] = serde_json::json!(cfg.max_n);
    }
    doc
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A self-contained HTML page rendered from the OpenAPI document (no scripts or assets to fetch, so it
/// works offline).
pub async fn docs() -> Html<String> {
    let api = ApiDoc::openapi();
    let mut body = String::new();
    for (path, item) in &api.paths.paths {
        let ops = [
            ("GET", &item.get),
            ("POST", &item.post),
            ("PUT", &item.put),
            ("DELETE", &item.delete),
        ];
        for (method, op) in ops {
            let Some(op) = op else { continue };
            let summary = op
                .summary
                .clone()
                .or_else(|| op.description.clone())
                .unwrap_or_default();
            body.push_str(&format!(
                "<section><h2><code>{method} {}</code></h2><p>{}</p>",
                escape(path),
                escape(&summary)
            ));
            if let Some(rb) = &op.request_body {
                let json = serde_json::to_string_pretty(rb).unwrap_or_default();
                body.push_str(&format!(
                    "<details><summary>request body</summary><pre>{}</pre></details>",
                    escape(&json)
                ));
            }
            body.push_str("<ul>");
            for (code, resp) in &op.responses.responses {
                let desc = match resp {
                    utoipa::openapi::RefOr::T(r) => r.description.clone(),
                    utoipa::openapi::RefOr::Ref(r) => r.ref_location.clone(),
                };
                body.push_str(&format!("<li><b>{code}</b> {}</li>", escape(&desc)));
            }
            body.push_str("</ul></section>");
        }
    }
    let schemas = api
        .components
        .as_ref()
        .map(|c| serde_json::to_string_pretty(&c.schemas).unwrap_or_default())
        .unwrap_or_default();
    Html(format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>t2 API</title>\
         <style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}pre{{background:#f4f4f4;padding:1em;overflow:auto}}</style>\
         </head><body><h1>t2 API</h1><p>OpenAI-compatible routes plus Transformer² extensions. \
         Machine-readable: <a href=\"/openapi.json\">/openapi.json</a>.</p>{body}\
         <details><summary>schemas</summary><pre>{}</pre></details></body></html>",
        escape(&schemas)
    ))
}
