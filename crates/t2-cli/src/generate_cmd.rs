use std::io::Write;
use std::time::Instant;

use anyhow::{bail, Result};
use clap::Args;
use t2_engine::{Adaptation, GenRequest};
use t2_model::{ChatMessage, SamplingParams};

use crate::common::{open_engine, ModelArgs, SvfArgs};

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub svf: SvfArgs,
    /// The user message
    #[arg(long)]
    pub prompt: String,
    /// A system message
    #[arg(long)]
    pub system: Option<String>,
    /// Adapt with one expert
    #[arg(long, conflicts_with = "mix")]
    pub expert: Option<String>,
    /// Adapt with a mix of experts, e.g. math=0.7,code=0.3
    #[arg(long)]
    pub mix: Option<String>,
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// 0 = greedy
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop when this text appears (repeatable)
    #[arg(long)]
    pub stop: Vec<String>,
}

pub fn run(a: GenerateArgs) -> Result<()> {
    let adaptation = match (&a.expert, &a.mix) {
        (Some(e), _) if e == "base" => Adaptation::base(),
        (Some(e), _) => Adaptation::expert(e),
        (None, Some(m)) => Adaptation::Mix(t2_svf::mix::parse_mix(m)?),
        (None, None) => Adaptation::base(),
    };
    if a.prompt.trim().is_empty() {
        bail!("--prompt must not be empty");
    }
    let sampling = SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        seed: a.seed,
        ..Default::default()
    };
    sampling.validate()?;
    // The decomposition is only needed when adapting.
    let engine = open_engine(&a.model, &a.svf, !adaptation.is_base())?;
    let mix = engine.lease(&adaptation)?;
    if let Some(svf) = &engine.svf {
        svf.merge(mix.id())?;
    }
    let mut messages = Vec::new();
    if let Some(s) = &a.system {
        messages.push(ChatMessage::new("system", s));
    }
    messages.push(ChatMessage::new("user", &a.prompt));
    let prompt = engine.encode_chat(&messages)?;
    let req = GenRequest {
        prompt,
        max_tokens: a.max_tokens,
        sampling,
        stop: a.stop.clone(),
        ignore_eos: false,
        score_from: None,
        also_score: Vec::new(),
    };
    let t0 = Instant::now();
    let mut first = None;
    let mut stdout = std::io::stdout().lock();
    let out = engine.generate(vec![(req, mix)], |_, ev| {
        first.get_or_insert_with(Instant::now);
        let _ = stdout.write_all(ev.text.as_bytes());
        let _ = stdout.flush();
    })?;
    let _ = writeln!(stdout);
    let o = &out[0];
    let total = t0.elapsed().as_secs_f64();
    let ttft = first.map(|f| (f - t0).as_secs_f64()).unwrap_or(total);
    let decode_tps = if o.tokens.len() > 1 {
        (o.tokens.len() - 1) as f64 / (total - ttft).max(1e-9)
    } else {
        0.0
    };
    eprintln!(
        "[{} prompt tokens, {} generated, finish={}, adaptation={}, first token {:.0} ms, decode {:.1} tok/s]",
        o.prompt_tokens,
        o.tokens.len(),
        o.finish.as_str(),
        adaptation,
        ttft * 1e3,
        decode_tps
    );
    Ok(())
}
