//! `/v1/adaptations`: few-shot adaptation as asynchronous jobs. A job runs the CEM search on the posted
//! examples through the server's own scheduler (its answers share batches with live requests), then
//! stores the result as a named mix that serves as `<model>:<name>`. Jobs run one at a time on their own
//! thread; at most a few wait. A job that fails or is cancelled stores nothing.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use serde::{Deserialize, Serialize};
use t2_adapt::cem::{self, CemConfig};
use t2_adapt::{Answerer, Generator};
use t2_engine::{Engine, Scheduler};
use t2_tasks::TaskItem;
use utoipa::ToSchema;

use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::request::ApiJson;
use crate::state::AppState;

/// Fewer examples than this cannot rank candidates at all.
const MIN_SHOTS: usize = 2;
/// Jobs waiting behind the running one at most.
const MAX_WAITING: usize = 4;
/// Finished jobs remembered (oldest forgotten first).
const MAX_FINISHED: usize = 256;
/// A job keeps at most this many answers in the scheduler's queue, so live requests still get in.
const MAX_OUTSTANDING: usize = 16;

/// Body of `POST /v1/adaptations`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AdaptationJobRequest {
    /// Name of the mix to store (used as `<model>:<name>`): not an expert's name, nor "base" or "auto".
    #[schema(pattern = r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}$")]
    pub name: String,
    /// Labelled examples: `{"prompt", "verifier": "number" | "choice" | "python", "answer", ...}`.
    #[schema(value_type = Vec<Object>, min_items = 2)]
    pub examples: Vec<serde_json::Value>,
    /// Examples the search scores on, at most as many as given (default: all of them; a fixed-seed
    /// sample when fewer).
    #[schema(minimum = 2, maximum = 9007199254740991_i64)]
    #[serde(default, deserialize_with = "crate::openai::safe_int::opt")]
    pub shots: Option<usize>,
    /// Examples held out of the search, on which the result is chosen among the search's best, its
    /// final mean, the base model and each expert alone (fewer experts win a tie): a guard against a mix
    /// that only fits the shots (default 0: the search's best). Shots plus held-out examples must not
    /// exceed the examples given.
    #[schema(minimum = 0, maximum = 9007199254740991_i64)]
    #[serde(default, deserialize_with = "crate::openai::safe_int::opt")]
    pub holdout: Option<usize>,
    /// CEM iterations (default 50).
    #[schema(minimum = 1, maximum = 1000)]
    #[serde(default, deserialize_with = "crate::openai::safe_int::opt")]
    pub iterations: Option<usize>,
    /// Candidates per iteration (default 32).
    #[schema(minimum = 2, maximum = 256)]
    #[serde(default, deserialize_with = "crate::openai::safe_int::opt")]
    pub population: Option<usize>,
    /// Elites per iteration, fewer than the population (default 6).
    #[schema(minimum = 1, maximum = 255)]
    #[serde(default, deserialize_with = "crate::openai::safe_int::opt")]
    pub elites: Option<usize>,
    #[schema(minimum = 0, maximum = 9007199254740991_i64)]
    #[serde(default, deserialize_with = "crate::openai::safe_int::opt")]
    pub seed: Option<u64>,
    /// Tokens per answer (default: by answer kind).
    #[schema(minimum = 1, maximum = 9007199254740991_i64)]
    #[serde(default, deserialize_with = "crate::openai::safe_int::opt")]
    pub max_tokens: Option<usize>,
    /// Experts to weigh (default: every loaded expert but classifiers).
    pub experts: Option<Vec<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct JobProgress {
    pub iteration: usize,
    pub iterations: usize,
    /// Best accuracy on the examples so far.
    pub best_accuracy: Option<f64>,
    pub elapsed_s: f64,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct JobResult {
    /// The stored mix's name.
    pub profile: String,
    /// The model id that serves it.
    pub model: String,
    pub alpha: BTreeMap<String, f32>,
    /// Accuracy of the mix on the examples.
    pub accuracy: f64,
    /// Mean log-likelihood per token of the reference answers, where it broke a tie.
    pub reference_loglik: Option<f64>,
    pub iterations: usize,
    pub seconds: f64,
    /// Answers generated during the search.
    pub generations: usize,
    /// Where a hold-out chose the result: the chosen contender ("search best", "search mean", "base" or
    /// "<expert> alone") and its accuracy on the held-out examples.
    pub chosen_on_held_out: Option<String>,
    pub held_out_accuracy: Option<f64>,
}

/// An adaptation job as `GET /v1/adaptations/{id}` shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AdaptationJob {
    pub id: String,
    /// always "adaptation.job"
    pub object: &'static str,
    pub name: String,
    pub status: JobStatus,
    pub created: u64,
    pub shots: usize,
    pub experts: Vec<String>,
    pub progress: JobProgress,
    pub result: Option<JobResult>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AdaptationJobList {
    pub object: &'static str,
    pub data: Vec<AdaptationJob>,
}

struct Entry {
    job: Mutex<AdaptationJob>,
    cancel: AtomicBool,
}

struct Work {
    entry: Arc<Entry>,
    shots: Vec<TaskItem>,
    held_out: Vec<TaskItem>,
    area: String,
    cfg: CemConfig,
}

/// Jobs by id, and their ids in creation order.
type JobTable = (HashMap<String, Arc<Entry>>, Vec<String>);

/// The job table and the queue in front of the job thread.
pub struct Jobs {
    entries: Mutex<JobTable>,
    tx: Mutex<Option<SyncSender<Work>>>,
}

impl Jobs {
    /// Starts the job thread; it adapts with `engine` through `scheduler`.
    pub fn start(engine: Arc<Engine>, scheduler: Arc<Scheduler>) -> Self {
        let (tx, rx) = sync_channel::<Work>(MAX_WAITING);
        let spawned = std::thread::Builder::new()
            .name("t2-adapt".into())
            .spawn(move || job_thread(engine, scheduler, rx));
        if let Err(e) = &spawned {
            tracing::error!(error = %e, "could not start the adaptation thread");
        }
        Self {
            entries: Mutex::new((HashMap::new(), Vec::new())),
            tx: Mutex::new(spawned.ok().map(|_| tx)),
        }
    }

    /// Stops taking jobs and asks the running one to stop (shutdown).
    pub fn close(&self) {
        self.tx.lock().expect("jobs lock").take();
        for e in self.entries.lock().expect("jobs lock").0.values() {
            e.cancel.store(true, Ordering::SeqCst);
        }
    }

    fn get(&self, id: &str) -> ApiResult<Arc<Entry>> {
        self.entries
            .lock()
            .expect("jobs lock")
            .0
            .get(id)
            .cloned()
            .ok_or_else(|| ApiError::NotFound(format!("no adaptation job with id '{id}'")))
    }

    fn insert(&self, entry: Arc<Entry>) {
        let mut g = self.entries.lock().expect("jobs lock");
        let id = entry.job.lock().expect("job lock").id.clone();
        g.0.insert(id.clone(), entry);
        g.1.push(id);
        // Forget the oldest finished jobs beyond the bound (running and queued ones stay).
        while g.1.len() > MAX_FINISHED + MAX_WAITING + 1 {
            let Some(pos) = g.1.iter().position(|id| {
                g.0.get(id).is_some_and(|e| {
                    !matches!(
                        e.job.lock().expect("job lock").status,
                        JobStatus::Queued | JobStatus::Running
                    )
                })
            }) else {
                break;
            };
            let old = g.1.remove(pos);
            g.0.remove(&old);
        }
    }

    fn remove(&self, id: &str) {
        let mut g = self.entries.lock().expect("jobs lock");
        g.0.remove(id);
        g.1.retain(|x| x != id);
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn job_thread(engine: Arc<Engine>, scheduler: Arc<Scheduler>, rx: Receiver<Work>) {
    while let Ok(w) = rx.recv() {
        let t0 = Instant::now();
        if w.entry.cancel.load(Ordering::SeqCst) {
            w.entry.job.lock().expect("job lock").status = JobStatus::Cancelled;
            continue;
        }
        w.entry.job.lock().expect("job lock").status = JobStatus::Running;
        let outcome = run_job(&engine, &scheduler, &w, t0);
        let mut job = w.entry.job.lock().expect("job lock");
        job.progress.elapsed_s = t0.elapsed().as_secs_f64();
        match outcome {
            Ok(Some(result)) => {
                job.status = JobStatus::Succeeded;
                job.result = Some(result);
            }
            Ok(None) => job.status = JobStatus::Cancelled,
            Err(e) => {
                tracing::warn!(job = %job.id, error = %e, "adaptation job failed");
                job.status = JobStatus::Failed;
                job.error = Some(e);
            }
        }
    }
}

/// The search, then the stored mix. None: cancelled (nothing stored).
fn run_job(
    engine: &Arc<Engine>,
    scheduler: &Arc<Scheduler>,
    w: &Work,
    t0: Instant,
) -> Result<Option<JobResult>, String> {
    // The experts the search weighs stay until the job ends (DELETE /v1/experts answers 409 meanwhile).
    let _pin = engine
        .experts
        .as_ref()
        .ok_or("this server runs without experts")?
        .pin(w.cfg.experts.iter().map(String::as_str))
        .map_err(|e| e.to_string())?;
    let generator = Generator::shared(scheduler.clone()).with_max_outstanding(MAX_OUTSTANDING);
    let answerer =
        Answerer::with_generator(engine.clone(), generator).map_err(|e| e.to_string())?;
    let mut outcome = cem::search(&answerer, &w.area, &w.shots, &w.cfg, |it| {
        let mut job = w.entry.job.lock().expect("job lock");
        job.progress.iteration = it.iteration + 1;
        job.progress.best_accuracy = Some(it.best_so_far.accuracy);
        job.progress.elapsed_s = t0.elapsed().as_secs_f64();
        !w.entry.cancel.load(Ordering::SeqCst)
    })
    .map_err(|e| e.to_string())?;
    if w.entry.cancel.load(Ordering::SeqCst) {
        return Ok(None);
    }
    t2_adapt::holdout::apply(
        &answerer,
        &w.area,
        &w.shots,
        &w.held_out,
        &w.cfg,
        &mut outcome,
    )
    .map_err(|e| e.to_string())?;
    if w.entry.cancel.load(Ordering::SeqCst) {
        return Ok(None);
    }
    let name = w.entry.job.lock().expect("job lock").name.clone();
    let mix = cem::stored_mix(
        &name,
        &outcome,
        &w.cfg,
        "examples posted to /v1/adaptations",
        w.shots.len(),
        "",
    );
    let store = engine
        .experts
        .as_ref()
        .ok_or("this server runs without experts")?;
    store.save_mix(mix).map_err(|e| e.to_string())?;
    Ok(Some(JobResult {
        profile: name.clone(),
        model: format!("{}:{name}", engine.loaded.model_id),
        alpha: outcome.mix.weights(),
        accuracy: outcome.best.accuracy,
        reference_loglik: outcome.best.loglik,
        iterations: outcome.history.len(),
        seconds: outcome.seconds,
        generations: outcome.generations,
        chosen_on_held_out: outcome.holdout.as_ref().map(|h| h.chosen().label.clone()),
        held_out_accuracy: outcome
            .holdout
            .as_ref()
            .map(|h| h.chosen().holdout.accuracy),
    }))
}

/// Checks the request fully before anything is queued: every error here is the client's.
/// What a valid request asks for: its shots, its held-out examples, the search's settings.
type Validated = (Vec<TaskItem>, Vec<TaskItem>, CemConfig);

fn validate(engine: &Engine, r: &AdaptationJobRequest) -> ApiResult<Validated> {
    let invalid = |m: String, p: &'static str| ApiError::invalid(m, p);
    // What the server holds decides first: with nothing to mix, no request could succeed (409, the
    // server's state, not the request, is what is wrong).
    let no_experts = |why: &str| ApiError::Conflict {
        message: format!("few-shot adaptation needs experts, and {why}"),
        code: "no_experts",
    };
    let store = engine
        .experts
        .as_ref()
        .ok_or_else(|| no_experts("this server runs without SVF"))?;
    if store.names().is_empty() {
        return Err(no_experts("no experts are loaded"));
    }
    t2_svf::expert::check_name(&r.name).map_err(|e| invalid(e.to_string(), "name"))?;
    if store.get(&r.name).is_ok() {
        return Err(invalid(
            format!(
                "'{}' is already an expert's name; choose another name for the mix",
                r.name
            ),
            "name",
        ));
    }
    let items = t2_tasks::shots::parse_examples(&r.examples).map_err(|e| invalid(e, "examples"))?;
    let shots = r.shots.unwrap_or(items.len());
    if items.len() < MIN_SHOTS || shots < MIN_SHOTS {
        return Err(invalid(
            format!(
                "too few examples: {} given and shots is {shots}; few-shot adaptation needs at least \
                 {MIN_SHOTS}",
                items.len()
            ),
            "examples",
        ));
    }
    if shots > items.len() {
        return Err(invalid(
            format!(
                "shots is {shots}, but only {} examples were given",
                items.len()
            ),
            "shots",
        ));
    }
    let holdout = r.holdout.unwrap_or(0);
    if shots.saturating_add(holdout) > items.len() {
        return Err(invalid(
            format!(
                "shots ({shots}) and holdout ({holdout}) ask for more than the {} examples given",
                items.len()
            ),
            "holdout",
        ));
    }
    let experts = match &r.experts {
        Some(list) => {
            for e in list {
                store
                    .get(e)
                    .map_err(|e| invalid(e.to_string(), "experts"))?;
            }
            list.clone()
        }
        None => cem::mixable_experts(engine),
    };
    if experts.is_empty() {
        return Err(invalid(
            "no experts are loaded: few-shot adaptation has nothing to mix".into(),
            "experts",
        ));
    }
    let (shots, held_out) = t2_adapt::eval::subset_and_next(&items, shots, holdout);
    let mut cfg = CemConfig::paper(experts);
    cfg.iterations = r.iterations.unwrap_or(cfg.iterations);
    cfg.population = r.population.unwrap_or(cfg.population);
    cfg.elites = r.elites.unwrap_or(cfg.elites);
    cfg.seed = r.seed.unwrap_or(cfg.seed);
    cfg.max_new_tokens = r
        .max_tokens
        .unwrap_or_else(|| t2_adapt::eval::default_max_tokens(&shots));
    cfg.check()
        .map_err(|e| invalid(e.to_string(), "iterations"))?;
    Ok((shots, held_out, cfg))
}

/// Starts a few-shot adaptation job.
#[utoipa::path(
    post,
    path = "/v1/adaptations",
    request_body = AdaptationJobRequest,
    responses(
        (status = 202, description = "The job, queued", body = AdaptationJob),
        (status = 400, description = "Invalid examples or settings", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 409, description = "No expert is loaded, so there is nothing to mix", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 429, description = "Too many jobs waiting", body = ErrorBody),
        (status = 503, description = "Loading or shutting down", body = ErrorBody),
    ),
    tag = "t2"
)]
pub async fn create(
    State(state): State<Arc<AppState>>,
    ApiJson(req): ApiJson<AdaptationJobRequest>,
) -> ApiResult<impl IntoResponse> {
    let core = state.core()?;
    let (shots, held_out, cfg) = validate(&core.engine, &req)?;
    let r: u128 = rand::random();
    let id = format!("adapt-{:024x}", r & ((1u128 << 96) - 1));
    let entry = Arc::new(Entry {
        job: Mutex::new(AdaptationJob {
            id: id.clone(),
            object: "adaptation.job",
            name: req.name.clone(),
            status: JobStatus::Queued,
            created: now_secs(),
            shots: shots.len(),
            experts: cfg.experts.clone(),
            progress: JobProgress {
                iteration: 0,
                iterations: cfg.iterations,
                best_accuracy: None,
                elapsed_s: 0.0,
            },
            result: None,
            error: None,
        }),
        cancel: AtomicBool::new(false),
    });
    let snapshot = entry.job.lock().expect("job lock").clone();
    core.jobs.insert(entry.clone());
    let tx = core.jobs.tx.lock().expect("jobs lock").clone();
    let Some(tx) = tx else {
        core.jobs.remove(&id);
        return Err(ApiError::Unavailable("the server is shutting down".into()));
    };
    let work = Work {
        entry,
        shots,
        held_out,
        area: "custom".into(),
        cfg,
    };
    if let Err(e) = tx.try_send(work) {
        core.jobs.remove(&id);
        return Err(match e {
            TrySendError::Full(_) => ApiError::Overloaded {
                message: format!(
                    "{MAX_WAITING} adaptation jobs are already waiting; retry when one finishes"
                ),
                retry_after_s: 30,
            },
            TrySendError::Disconnected(_) => {
                ApiError::Unavailable("the adaptation worker is not running".into())
            }
        });
    }
    Ok((StatusCode::ACCEPTED, Json(snapshot)))
}

/// One job: its status, progress and (once done) the stored mix.
#[utoipa::path(
    get,
    path = "/v1/adaptations/{id}",
    params(("id" = String, Path, description = "The job id")),
    responses(
        (status = 200, description = "The job", body = AdaptationJob),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 404, description = "No such job", body = ErrorBody),
        (status = 503, description = "Loading or shutting down", body = ErrorBody),
    ),
    tag = "t2"
)]
pub async fn get(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<Json<AdaptationJob>> {
    let entry = state.core()?.jobs.get(&id)?;
    let job = entry.job.lock().expect("job lock").clone();
    Ok(Json(job))
}

/// Every job the server remembers, oldest first.
#[utoipa::path(
    get,
    path = "/v1/adaptations",
    responses(
        (status = 200, description = "The jobs", body = AdaptationJobList),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 503, description = "Loading or shutting down", body = ErrorBody),
    ),
    tag = "t2"
)]
pub async fn list(State(state): State<Arc<AppState>>) -> ApiResult<Json<AdaptationJobList>> {
    let core = state.core()?;
    let g = core.jobs.entries.lock().expect("jobs lock");
    let data =
        g.1.iter()
            .filter_map(|id| g.0.get(id))
            .map(|e| e.job.lock().expect("job lock").clone())
            .collect();
    Ok(Json(AdaptationJobList {
        object: "list",
        data,
    }))
}

/// Cancels a queued or running job (it stops after its current iteration and stores nothing).
#[utoipa::path(
    delete,
    path = "/v1/adaptations/{id}",
    params(("id" = String, Path, description = "The job id")),
    responses(
        (status = 200, description = "The job, cancelling", body = AdaptationJob),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 404, description = "No such job", body = ErrorBody),
        (status = 503, description = "Loading or shutting down", body = ErrorBody),
    ),
    tag = "t2"
)]
pub async fn cancel(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<Json<AdaptationJob>> {
    let entry = state.core()?.jobs.get(&id)?;
    entry.cancel.store(true, Ordering::SeqCst);
    let job = entry.job.lock().expect("job lock").clone();
    Ok(Json(job))
}
