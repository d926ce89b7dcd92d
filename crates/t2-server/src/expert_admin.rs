//! `POST /v1/experts` and `DELETE /v1/experts/{name}`: changing the experts while serving. Both need an
//! admin key (`--admin-key`); without one configured they are refused. An upload is validated exactly as
//! at start (model, decomposition, lengths, NaN/Inf) and becomes `<base>:<name>` at once; a removal is
//! refused while any request or running sequence still uses the expert. The store writes the files first
//! and the manifest last, so a failure leaves the previous state. Every change is logged.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde::Serialize;
use t2_svf::{Expert, SvfError};
use utoipa::ToSchema;

use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::openai::{ExpertCard, ExpertFile};
use crate::state::{AppState, Core};

/// What `DELETE /v1/experts/{name}` answers.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeletedExpert {
    /// The expert's name.
    pub id: String,
    /// always "expert"
    pub object: &'static str,
    /// always true
    pub deleted: bool,
}

/// Only admin keys may change the experts; with none configured nobody may. Returns who asked, for the
/// log.
fn require_admin(state: &AppState, headers: &HeaderMap) -> ApiResult<&'static str> {
    if state.cfg.admin_keys.is_empty() {
        return Err(ApiError::Forbidden(
            "changing experts over HTTP is turned off: start the server with --admin-key (or \
             $T2_ADMIN_KEY)"
                .into(),
        ));
    }
    let Some(given) = crate::bearer(headers) else {
        return Err(ApiError::Unauthorized(
            "missing admin key: send 'Authorization: Bearer <admin key>'".into(),
        ));
    };
    if crate::key_in(&state.cfg.admin_keys, given) {
        return Ok("admin key");
    }
    if crate::key_in(&state.cfg.api_keys, given) {
        return Err(ApiError::Forbidden(
            "this API key may only generate; changing experts needs an admin key".into(),
        ));
    }
    Err(ApiError::Unauthorized("invalid admin key".into()))
}

/// Names become file names and model ids: nothing path-like gets through.
fn bad_name(name: &str, param: &'static str) -> ApiError {
    ApiError::invalid(
        format!(
            "'{name}' is not a valid expert name (1-64 characters: letters, digits, '_', '-', '.', not \
             starting with '.'; 'base' and 'auto' are reserved)"
        ),
        param,
    )
}

fn svf_error(e: SvfError, param: &'static str) -> ApiError {
    match e {
        SvfError::BadExpert { .. } | SvfError::BadMix(_) => ApiError::invalid(e.to_string(), param),
        SvfError::UnknownExpert { name, .. } => {
            ApiError::NotFound(format!("no expert named '{name}'"))
        }
        SvfError::Conflict(message) => ApiError::Conflict {
            message,
            code: "conflict",
        },
        other => ApiError::Internal(other.to_string()),
    }
}

/// Runs a change to the experts off the async runtime (it writes files and may tokenize labels), one at
/// a time.
async fn blocking<T: Send + 'static>(
    state: &Arc<AppState>,
    f: impl FnOnce(&Core) -> ApiResult<T> + Send + 'static,
) -> ApiResult<T> {
    state.core()?;
    let state = state.clone();
    tokio::task::spawn_blocking(move || {
        let core = state.core()?;
        let _one_at_a_time = core.expert_writes.lock().expect("expert writes lock");
        f(core)
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))?
}

/// Uploads an expert: the body is the expert's safetensors file as `t2 experts synth` or `t2 train`
/// writes it (`Content-Type: application/octet-stream`); its name is the one in the file's metadata.
/// A name already taken by an expert is replaced by the new version (nothing made from the old one is
/// reused); a stored mix's name is refused.
#[utoipa::path(
    post,
    path = "/v1/experts",
    request_body(content = ExpertFile, content_type = "application/octet-stream", description = "An expert file (safetensors, format t2-expert-v1)"),
    responses(
        (status = 201, description = "Stored: served as `<base>:<name>` from now on", body = ExpertCard),
        (status = 200, description = "An expert of that name was replaced", body = ExpertCard),
        (status = 400, description = "Not an expert file, or not one for this model and decomposition (lengths, NaN/Inf, name)", body = ErrorBody),
        (status = 401, description = "Missing or wrong key", body = ErrorBody),
        (status = 403, description = "Not an admin key, or uploads are turned off (no --admin-key)", body = ErrorBody),
        (status = 409, description = "The name is a stored mix's", body = ErrorBody),
        (status = 413, description = "Larger than --max-expert-bytes", body = ErrorBody),
        (status = 503, description = "Loading or shutting down", body = ErrorBody),
    ),
    tag = "t2"
)]
pub async fn upload(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<impl IntoResponse> {
    let who = require_admin(&state, &headers)?;
    let limit = state.cfg.max_expert_bytes;
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::PayloadTooLarge(limit));
    }
    let bytes = axum::body::to_bytes(body, limit).await.map_err(|e| {
        // to_bytes reports the limit only through its error's source chain (http-body-util's
        // LengthLimitError, "length limit exceeded"); anything else is a broken upload.
        let mut source: Option<&dyn std::error::Error> = Some(&e);
        while let Some(err) = source {
            if err.to_string().contains("length limit") {
                return ApiError::PayloadTooLarge(limit);
            }
            source = err.source();
        }
        ApiError::invalid(format!("cannot read the request body: {e}"), "file")
    })?;
    let (card, replaced) = blocking(&state, move |core| {
        let engine = &core.engine;
        let (Some(svf), Some(store)) = (&engine.svf, &engine.experts) else {
            return Err(ApiError::invalid(
                "this server runs without SVF, so it takes no experts",
                "file",
            ));
        };
        let expert = Expert::from_bytes(&bytes, "upload").map_err(|e| svf_error(e, "file"))?;
        let name = expert.meta.name.clone();
        t2_svf::expert::check_name(&name).map_err(|_| bad_name(&name, "file"))?;
        expert
            .validate(&svf.decomp, store.model_id())
            .map_err(|e| svf_error(e, "file"))?;
        // Pass 1 must still tell the categories apart with this expert among the others.
        let others = store.experts();
        let candidates: Vec<&Expert> = others
            .iter()
            .map(|e| e.as_ref())
            .filter(|e| e.meta.name != name)
            .chain([&expert])
            .collect();
        if let Err(why) = crate::mix_choice::router_state(engine, Some(candidates.as_slice())) {
            if why != crate::mix_choice::NOTHING_TO_ROUTE {
                return Err(ApiError::invalid(
                    format!("with this expert, pass-1 routing would fail: {why}"),
                    "file",
                ));
            }
        }
        let up = store
            .upload(expert, &svf.decomp)
            .map_err(|e| svf_error(e, "file"))?;
        if let Some(old) = &up.replaced {
            // The old version's idle table slots and merged weights go now. Held ones serve their
            // sequences to the end, then are evicted like any idle slot: their keys name the old digest,
            // so no new request can reach them.
            let freed = svf.forget(|k| k.uses(&name, old));
            tracing::info!(expert = %name, digest = %up.digest, replaced = %old, slots_freed = freed,
                by = who, "expert replaced");
        } else {
            tracing::info!(expert = %name, digest = %up.digest, by = who, "expert uploaded");
        }
        core.rebuild_router();
        let card = crate::info::expert_cards(core)
            .into_iter()
            .find(|c| c.name == name)
            .ok_or_else(|| ApiError::Internal(format!("expert '{name}' vanished")))?;
        Ok((card, up.replaced.is_some()))
    })
    .await?;
    let status = if replaced {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, Json(card)))
}

/// Removes an expert: refused (409) while a request or a running sequence uses it, while a stored mix
/// names it, or when it is the server's default adaptation. Its file and manifest entry go, and with
/// them every idle mix-table slot and merged weights made from it.
#[utoipa::path(
    delete,
    path = "/v1/experts/{name}",
    params(("name" = String, Path, description = "The expert's name")),
    responses(
        (status = 200, description = "Removed", body = DeletedExpert),
        (status = 400, description = "Not a valid expert name", body = ErrorBody),
        (status = 401, description = "Missing or wrong key", body = ErrorBody),
        (status = 403, description = "Not an admin key, or changes are turned off (no --admin-key)", body = ErrorBody),
        (status = 404, description = "No such expert", body = ErrorBody),
        (status = 409, description = "In use, part of a stored mix, or the default adaptation", body = ErrorBody),
        (status = 503, description = "Loading or shutting down", body = ErrorBody),
    ),
    tag = "t2"
)]
pub async fn remove(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult<Json<DeletedExpert>> {
    let who = require_admin(&state, &headers)?;
    let default = state.cfg.default_strategy.clone();
    let deleted = blocking(&state, move |core| {
        let engine = &core.engine;
        let (Some(svf), Some(store)) = (&engine.svf, &engine.experts) else {
            return Err(ApiError::NotFound(format!("no expert named '{name}'")));
        };
        t2_svf::expert::check_name(&name).map_err(|_| bad_name(&name, "name"))?;
        store.get(&name).map_err(|e| svf_error(e, "name"))?;
        refuse_default(engine, &default, &name)?;
        let digest = store
            .remove(&name, |digest| {
                let held: usize = svf
                    .slots()
                    .iter()
                    .filter(|s| s.key.uses(&name, digest))
                    .map(|s| s.holders)
                    .sum();
                (held > 0).then(|| format!("{held} running sequence(s) hold its weights"))
            })
            .map_err(|e| match e {
                SvfError::Conflict(message) => ApiError::Conflict {
                    message,
                    code: "expert_in_use",
                },
                other => svf_error(other, "name"),
            })?;
        let freed = svf.forget(|k| k.uses(&name, &digest));
        tracing::info!(expert = %name, digest = %digest, slots_freed = freed, by = who,
            "expert removed");
        core.rebuild_router();
        Ok(DeletedExpert {
            id: name,
            object: "expert",
            deleted: true,
        })
    })
    .await?;
    Ok(Json(deleted))
}

/// The server's default adaptation must keep working: its expert stays, and a routing default keeps
/// something to route to.
fn refuse_default(
    engine: &t2_engine::Engine,
    default: &crate::mix_choice::DefaultStrategy,
    name: &str,
) -> ApiResult<()> {
    use crate::mix_choice::DefaultStrategy as D;
    let conflict = |message: String| ApiError::Conflict {
        message,
        code: "conflict",
    };
    match default {
        D::Expert(e) if e == name => Err(conflict(format!(
            "expert '{name}' is the server's default adaptation"
        ))),
        D::Route(_) => {
            let others = engine
                .experts
                .as_ref()
                .map(|s| s.experts())
                .unwrap_or_default();
            let rest: Vec<&Expert> = others
                .iter()
                .map(|e| e.as_ref())
                .filter(|e| e.meta.name != name)
                .collect();
            match crate::mix_choice::router_state(engine, Some(rest.as_slice())) {
                Ok(_) => Ok(()),
                Err(why) => Err(conflict(format!(
                    "the server routes requests by default, and without expert '{name}' routing would \
                     fail: {why}"
                ))),
            }
        }
        _ => Ok(()),
    }
}
