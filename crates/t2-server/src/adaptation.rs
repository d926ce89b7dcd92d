//! From a request's `model` and `adaptation` fields to the engine's adaptation, a bounded metrics label,
//! and the `adaptation` object every response carries.

use std::collections::BTreeMap;

use t2_engine::{Adaptation, Engine};

use crate::error::{ApiError, ApiResult};
use crate::openai::{AdaptationInfo, AdaptationRequest};

/// What the server does for a request that names the plain base model.
#[derive(Debug, Clone, PartialEq)]
pub enum DefaultStrategy {
    None,
    Expert(String),
    Profile(String),
}

impl std::str::FromStr for DefaultStrategy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "none" | "base" => Self::None,
            _ if s.starts_with("expert:") => Self::Expert(s["expert:".len()..].to_string()),
            _ if s.starts_with("profile:") => Self::Profile(s["profile:".len()..].to_string()),
            _ => {
                return Err(format!(
                    "unknown default adaptation '{s}' (expected none, expert:NAME or profile:NAME)"
                ))
            }
        })
    }
}

#[derive(Debug, Clone)]
pub struct Chosen {
    pub adaptation: Adaptation,
    pub info: AdaptationInfo,
    /// Metrics label: base, auto, an expert or profile name, or "custom" for ad-hoc mixes.
    pub label: String,
    /// The `x-t2-mix` header value.
    pub header: String,
}

fn info(strategy: &str, mix: BTreeMap<String, f32>) -> AdaptationInfo {
    AdaptationInfo {
        strategy: strategy.into(),
        mix,
        profile: None,
        scores: None,
        pass1_ms: None,
        note: None,
    }
}

fn base(strategy: &str) -> Chosen {
    Chosen {
        adaptation: Adaptation::Base,
        info: info(strategy, BTreeMap::new()),
        label: "base".into(),
        header: "base".into(),
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
    Ok(Chosen {
        adaptation: Adaptation::Expert(name.into()),
        info: info("expert", BTreeMap::from([(name.to_string(), 1.0)])),
        label: name.into(),
        header: format!("expert:{name}"),
    })
}

fn mix(engine: &Engine, alpha: BTreeMap<String, f32>, profile: Option<&str>) -> ApiResult<Chosen> {
    let a = Adaptation::Mix(alpha.clone());
    engine
        .check_adaptation(&a)
        .map_err(|e| ApiError::invalid(e.to_string(), "adaptation"))?;
    let header = a.canonical_name();
    let mut i = info(if profile.is_some() { "profile" } else { "mix" }, alpha);
    i.profile = profile.map(str::to_string);
    Ok(Chosen {
        adaptation: a,
        info: i,
        label: profile.unwrap_or("custom").to_string(),
        header,
    })
}

fn profile(engine: &Engine, name: &str) -> ApiResult<Option<Chosen>> {
    let Some(stored) = engine.experts.as_ref().and_then(|s| s.mix(name)) else {
        return Ok(None);
    };
    mix(engine, stored.alpha.clone(), Some(name)).map(Some)
}

/// `auto` asks for pass-1 routing; until a router is configured it runs the base model and says so.
fn auto() -> Chosen {
    let mut c = base("auto");
    c.label = "auto".into();
    c.info.note =
        Some("no pass-1 router is configured on this server: the base model answered".into());
    c
}

fn from_default(engine: &Engine, d: &DefaultStrategy) -> ApiResult<Chosen> {
    match d {
        DefaultStrategy::None => Ok(base("none")),
        DefaultStrategy::Expert(e) => expert(engine, e),
        DefaultStrategy::Profile(p) => profile(engine, p)?
            .ok_or_else(|| ApiError::Internal(format!("default profile '{p}' does not exist"))),
    }
}

/// Resolves `model` (`<base>`, `<base>:base`, `<base>:auto`, `<base>:<expert>`, `<base>:<profile>`) and
/// the optional `adaptation` body field.
pub fn choose(
    engine: &Engine,
    default: &DefaultStrategy,
    model: &str,
    body: Option<&AdaptationRequest>,
) -> ApiResult<Chosen> {
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
        return from_body(engine, a);
    }
    match suffix {
        None => from_default(engine, default),
        Some("base") => Ok(base("none")),
        Some("auto") => Ok(auto()),
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

fn from_body(engine: &Engine, a: &AdaptationRequest) -> ApiResult<Chosen> {
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
    match strategy {
        "none" | "base" if given == 0 => Ok(base("none")),
        "auto" if given == 0 => Ok(auto()),
        "expert" => expert(engine, need(a.expert.as_deref(), strategy, "expert")?),
        "profile" => {
            let name = need(a.profile.as_deref(), strategy, "profile")?;
            profile(engine, name)?.ok_or_else(|| {
                ApiError::invalid(format!("no stored mix named '{name}'"), "adaptation")
            })
        }
        "mix" => {
            let alpha = a.mix.clone().ok_or_else(|| {
                ApiError::invalid("adaptation.strategy 'mix' needs adaptation.mix", "adaptation")
            })?;
            mix(engine, alpha, None)
        }
        "none" | "base" | "auto" => Err(ApiError::invalid(
            format!("adaptation.strategy '{strategy}' takes no expert, mix or profile"),
            "adaptation",
        )),
        other => Err(ApiError::invalid(
            format!("unknown adaptation.strategy '{other}' (expected none, expert, mix, profile or auto)"),
            "adaptation",
        )),
    }
}
