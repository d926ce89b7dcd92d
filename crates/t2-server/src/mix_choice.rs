//! From a request's `model` and `adaptation` fields to the engine's adaptation, a bounded metrics label,
//! and the `adaptation` object every response carries.

use t2_engine::{Adaptation, Engine, Mix, RouteDecision, RoutePolicy, RouteStrategy, Router};

use crate::error::{ApiError, ApiResult};
use crate::openai::{AdaptationInfo, AdaptationRequest};

/// Pass-1 routing as a request or the server's default asks for it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RouteChoice {
    /// The server's `--auto-strategy` (the classifier when one is loaded, else the prompt).
    Auto,
    Fixed(RouteStrategy),
}

impl RouteChoice {
    /// `auto`, `prompt` or `classifier`; None for any other word.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "auto" => Some(Self::Auto),
            other => other.parse().ok().map(Self::Fixed),
        }
    }
}

/// What the server does for a request that names the plain base model.
#[derive(Debug, Clone, PartialEq)]
pub enum DefaultStrategy {
    None,
    Expert(String),
    Profile(String),
    Route(RouteChoice),
}

impl std::str::FromStr for DefaultStrategy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(r) = RouteChoice::parse(s) {
            return Ok(Self::Route(r));
        }
        Ok(match s {
            "none" | "base" => Self::None,
            _ if s.starts_with("expert:") => Self::Expert(s["expert:".len()..].to_string()),
            _ if s.starts_with("profile:") => Self::Profile(s["profile:".len()..].to_string()),
            _ => {
                return Err(format!(
                    "unknown default adaptation '{s}' (expected none, auto, prompt, classifier, \
                     expert:NAME or profile:NAME)"
                ))
            }
        })
    }
}

/// How `auto` routes, and the policy routing uses when a request does not say.
#[derive(Debug, Clone, PartialEq)]
pub struct RoutingConfig {
    /// Classifier falls back to prompt when no classifier expert is loaded.
    pub auto: RouteStrategy,
    pub policy: RoutePolicy,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            auto: RouteStrategy::Classifier,
            policy: RoutePolicy::default(),
        }
    }
}

/// The router the server built from its experts, or why there is none.
pub type RouterState = Result<Router, String>;

/// Why routing is unavailable when no pass-2 expert is loaded.
pub const NOTHING_TO_ROUTE: &str = "no experts are loaded, so there is nothing to route to";

/// Pass-1 routing over the stored experts, or over `experts` when given (the set an upload would make).
pub fn router_state(engine: &Engine, experts: Option<&[&t2_svf::Expert]>) -> RouterState {
    // Only the router that will serve is logged, not a candidate checked for an upload.
    let serving = experts.is_none();
    let built = match experts {
        Some(list) => Router::from_experts(engine, list.iter().copied()),
        None => Router::from_engine(engine),
    };
    match built {
        Ok(Some(r)) => {
            if serving {
                tracing::info!(labels = ?r.label_names(), classifier = ?r.classifier, "pass-1 routing ready");
            }
            Ok(r)
        }
        Ok(None) => Err(NOTHING_TO_ROUTE.to_string()),
        Err(e) => {
            if serving {
                tracing::warn!(error = %e, "pass-1 routing is unavailable");
            }
            Err(e.to_string())
        }
    }
}

/// Pass 1 still to run for a request: which strategy, with which policy.
#[derive(Debug, Clone)]
pub struct Routing {
    pub strategy: RouteStrategy,
    pub policy: RoutePolicy,
}

#[derive(Debug, Clone)]
pub struct Chosen {
    pub mix: Mix,
    pub info: AdaptationInfo,
    /// Metrics label: base, auto, an expert or profile name, or "custom" for ad-hoc mixes.
    pub label: String,
    /// Pass 1 to run before answering; `mix` and `info` are then filled from its decision.
    pub routing: Option<Routing>,
}

impl Chosen {
    pub fn adaptation(&self) -> Adaptation {
        Adaptation::Mix(self.mix.clone())
    }

    /// The `x-t2-mix` header value.
    pub fn header(&self) -> String {
        self.mix.to_string()
    }

    /// Takes pass 1's decision: the answer's mix, the label scores and the pass-1 time.
    pub fn apply(&mut self, d: &RouteDecision) {
        self.mix = d.mix.clone();
        self.info.strategy = d.strategy.to_string();
        self.info.label = Some(d.label.clone());
        self.info.mix = d.mix.weights();
        self.info.scores = Some(d.scores.clone());
        self.info.pass1_ms = Some(d.pass1.as_secs_f64() * 1e3);
        if d.below_threshold {
            self.info.note = Some(format!(
                "the top label '{}' scored under the threshold: the base model answered",
                d.label
            ));
        }
    }
}

fn info(strategy: &str, mix: &Mix) -> AdaptationInfo {
    AdaptationInfo {
        strategy: strategy.into(),
        label: None,
        policy: None,
        mix: mix.weights(),
        profile: None,
        scores: None,
        pass1_ms: None,
        note: None,
    }
}

fn base(strategy: &str) -> Chosen {
    Chosen {
        mix: Mix::base(),
        info: info(strategy, &Mix::base()),
        label: "base".into(),
        routing: None,
    }
}

fn expert(engine: &Engine, name: &str) -> ApiResult<Chosen> {
    let store = engine
        .experts
        .as_ref()
        .ok_or_else(|| ApiError::invalid("this server runs without experts", "adaptation"))?;
    store
        .get(name)
        .map_err(|e| ApiError::invalid(e.to_string(), "adaptation"))?;
    let mix = Mix::expert(name);
    Ok(Chosen {
        info: info("expert", &mix),
        mix,
        label: name.into(),
        routing: None,
    })
}

fn mix(engine: &Engine, mix: Mix, profile: Option<&str>) -> ApiResult<Chosen> {
    engine
        .check_adaptation(&Adaptation::Mix(mix.clone()))
        .map_err(|e| ApiError::invalid(e.to_string(), "adaptation"))?;
    let mut i = info(if profile.is_some() { "profile" } else { "mix" }, &mix);
    i.profile = profile.map(str::to_string);
    Ok(Chosen {
        mix,
        info: i,
        label: profile.unwrap_or("custom").to_string(),
        routing: None,
    })
}

fn profile(engine: &Engine, name: &str) -> ApiResult<Option<Chosen>> {
    let Some(stored) = engine.experts.as_ref().and_then(|s| s.mix(name)) else {
        return Ok(None);
    };
    mix(engine, stored.mix, Some(name)).map(Some)
}

/// Everything `choose` needs besides the request.
pub struct Context<'a> {
    pub engine: &'a Engine,
    pub router: std::sync::Arc<RouterState>,
    pub default: &'a DefaultStrategy,
    pub routing: &'a RoutingConfig,
}

/// Pass-1 routing; the policy and threshold default to the server's.
fn route(
    cx: &Context,
    choice: RouteChoice,
    policy: Option<&str>,
    threshold: Option<f64>,
) -> ApiResult<Chosen> {
    let router = match &*cx.router {
        Ok(r) => r,
        Err(why) => {
            return Err(ApiError::invalid(
                format!("routing is unavailable: {why}"),
                "adaptation",
            ))
        }
    };
    let mut note = None;
    let strategy = match choice {
        RouteChoice::Auto
            if cx.routing.auto == RouteStrategy::Classifier && router.classifier.is_none() =>
        {
            note = Some(
                "no classifier expert is loaded: pass 1 used the base model's prompt routing"
                    .into(),
            );
            RouteStrategy::Prompt
        }
        RouteChoice::Auto => cx.routing.auto,
        RouteChoice::Fixed(s) => s,
    };
    if strategy == RouteStrategy::Classifier && router.classifier.is_none() {
        return Err(ApiError::invalid(
            "adaptation.strategy 'classifier' needs a classifier expert (category 'routing'), and none \
             is loaded; use 'prompt'",
            "adaptation",
        ));
    }
    let mut policy_value = cx.routing.policy;
    match policy {
        None => {}
        Some("hard") => policy_value.soft = false,
        Some("soft") => policy_value.soft = true,
        Some(other) => {
            return Err(ApiError::invalid(
                format!("adaptation.policy must be 'hard' or 'soft', got '{other}'"),
                "adaptation",
            ))
        }
    }
    if let Some(t) = threshold {
        if !(t.is_finite() && (0.0..=1.0).contains(&t)) {
            return Err(ApiError::invalid(
                format!("adaptation.threshold must be between 0 and 1, got {t}"),
                "adaptation",
            ));
        }
        policy_value.threshold = t as f32;
    }
    let mut c = base(strategy.as_str());
    c.label = "auto".into();
    c.info.note = note;
    c.info.policy = Some(if policy_value.soft { "soft" } else { "hard" }.into());
    c.routing = Some(Routing {
        strategy,
        policy: policy_value,
    });
    Ok(c)
}

fn from_default(cx: &Context) -> ApiResult<Chosen> {
    match cx.default {
        DefaultStrategy::None => Ok(base("none")),
        DefaultStrategy::Expert(e) => expert(cx.engine, e),
        DefaultStrategy::Profile(p) => profile(cx.engine, p)?
            .ok_or_else(|| ApiError::Internal(format!("default profile '{p}' does not exist"))),
        DefaultStrategy::Route(r) => route(cx, *r, None, None),
    }
}

/// Resolves `model` (`<base>`, `<base>:base`, `<base>:auto`, `<base>:<expert>`, `<base>:<profile>`) and
/// the optional `adaptation` body field.
pub fn choose(cx: &Context, model: &str, body: Option<&AdaptationRequest>) -> ApiResult<Chosen> {
    let engine = cx.engine;
    let base_id = &engine.loaded.model_id;
    let suffix = match model.split_once(':') {
        Some((b, s)) if b == base_id => Some(s),
        None if model == base_id => None,
        _ => {
            return Err(ApiError::ModelNotFound(format!(
                "the model '{model}' does not exist (GET /v1/models lists them)"
            )))
        }
    };
    if let Some(a) = body {
        if suffix.is_some() {
            return Err(ApiError::invalid(
                format!("'adaptation' can only be combined with the plain model id '{base_id}', not '{model}'"),
                "adaptation",
            ));
        }
        return from_body(cx, a);
    }
    match suffix {
        None => from_default(cx),
        Some("base") => Ok(base("none")),
        Some("auto") => route(cx, RouteChoice::Auto, None, None),
        Some(name) => {
            let is_expert = engine.experts.as_ref().is_some_and(|s| s.get(name).is_ok());
            if is_expert {
                return expert(engine, name);
            }
            profile(engine, name)?.ok_or_else(|| {
                ApiError::ModelNotFound(format!(
                    "the model '{model}' does not exist: '{name}' is neither an expert nor a stored mix \
                     (GET /v1/models lists them)"
                ))
            })
        }
    }
}

fn from_body(cx: &Context, a: &AdaptationRequest) -> ApiResult<Chosen> {
    let engine = cx.engine;
    let strategy = match &a.strategy {
        Some(s) => s.as_str(),
        None if a.mix.is_some() => "mix",
        None if a.expert.is_some() => "expert",
        None if a.profile.is_some() => "profile",
        None => "none",
    };
    let given = [a.mix.is_some(), a.expert.is_some(), a.profile.is_some()]
        .iter()
        .filter(|&&x| x)
        .count();
    if given > 1 {
        return Err(ApiError::invalid(
            "give only one of adaptation.mix, adaptation.expert and adaptation.profile",
            "adaptation",
        ));
    }
    fn need<'a>(what: Option<&'a str>, strategy: &str, field: &str) -> ApiResult<&'a str> {
        what.ok_or_else(|| {
            ApiError::invalid(
                format!("adaptation.strategy '{strategy}' needs adaptation.{field}"),
                "adaptation",
            )
        })
    }
    let routed = RouteChoice::parse(strategy);
    if routed.is_none() && (a.policy.is_some() || a.threshold.is_some()) {
        return Err(ApiError::invalid(
            format!(
                "adaptation.policy and adaptation.threshold apply to routing (auto, prompt, classifier), \
                 not to '{strategy}'"
            ),
            "adaptation",
        ));
    }
    match strategy {
        "none" | "base" if given == 0 => Ok(base("none")),
        _ if given == 0 && routed.is_some() => route(
            cx,
            routed.expect("checked"),
            a.policy.as_deref(),
            a.threshold,
        ),
        "expert" => expert(engine, need(a.expert.as_deref(), strategy, "expert")?),
        "profile" => {
            let name = need(a.profile.as_deref(), strategy, "profile")?;
            profile(engine, name)?.ok_or_else(|| {
                ApiError::invalid(format!("no stored mix named '{name}'"), "adaptation")
            })
        }
        "mix" => {
            let weights = a.mix.as_ref().ok_or_else(|| {
                ApiError::invalid(
                    "adaptation.strategy 'mix' needs adaptation.mix",
                    "adaptation",
                )
            })?;
            let m = Mix::from_weights(weights)
                .map_err(|e| ApiError::invalid(e.to_string(), "adaptation"))?;
            mix(engine, m, None)
        }
        "none" | "base" | "auto" | "prompt" | "classifier" => Err(ApiError::invalid(
            format!("adaptation.strategy '{strategy}' takes no expert, mix or profile"),
            "adaptation",
        )),
        other => Err(ApiError::invalid(
            format!(
                "unknown adaptation.strategy '{other}' (expected none, expert, mix, profile, \
                 prompt, classifier or auto)"
            ),
            "adaptation",
        )),
    }
}
