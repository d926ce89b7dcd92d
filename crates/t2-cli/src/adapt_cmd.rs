//! `t2 adapt`: few-shot adaptation. A CEM search over the experts' weights on a handful of examples,
//! stored as a named mix that serves as `<model>:<name>`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use t2_adapt::cem::{self, CemConfig};
use t2_adapt::Answerer;
use t2_tasks::{Split, TaskItem};

use crate::common::{open_engine, ModelArgs, SvfArgs};

#[derive(Args, Debug)]
pub struct AdaptArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub svf: SvfArgs,
    /// Examples: a JSONL file (one {"prompt", "verifier", "answer", ...} per line), or the name of a task
    /// in the data directory (its training split)
    #[arg(long)]
    pub task: String,
    /// Examples the search scores on (a fixed-seed sample when there are more)
    #[arg(long, default_value_t = 10)]
    pub shots: usize,
    /// Name of the mix to store
    #[arg(long)]
    pub name: String,
    #[arg(long, default_value_t = 50)]
    pub iterations: usize,
    #[arg(long, default_value_t = 32)]
    pub population: usize,
    #[arg(long, default_value_t = 6)]
    pub elites: usize,
    #[arg(long, default_value_t = 0.5)]
    pub init_std: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Tokens per answer [default: by answer kind]
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    /// Experts to weigh (comma-separated) [default: every loaded expert but classifiers]
    #[arg(long, value_delimiter = ',')]
    pub experts: Vec<String>,
    /// Also time the first population evaluated one candidate after another (batched vs sequential)
    #[arg(long)]
    pub compare_sequential: bool,
    /// Write the search (every iteration, the cost comparison) as JSON here
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Search only: do not store the mix
    #[arg(long)]
    pub no_save: bool,
    #[arg(long, env = "T2_DATA", default_value = "data/tasks")]
    pub data: PathBuf,
    /// Sequences generated together
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Score multiple-choice examples by each option's likelihood instead of generating answers (what
    /// makes the paper's budget affordable)
    #[arg(long)]
    pub likelihood: bool,
    /// Save the search's state here after every iteration, and go on from it when it exists (a search
    /// with the same settings): a long search survives being stopped
    #[arg(long)]
    pub state: Option<PathBuf>,
    /// Drop the sparsity prior: no base and single-expert candidates in the first population, and ties
    /// in accuracy broken by likelihood alone, not by fewer experts first
    #[arg(long)]
    pub no_sparsity_prior: bool,
    /// Hold this many more examples out of the search and choose the result on them among the search's
    /// best, its final mean, the base model and each expert alone (fewer experts win a tie): a guard
    /// against a mix that only fits the shots
    #[arg(long, default_value_t = 0)]
    pub holdout: usize,
    /// Hold out every example the shots leave, up to this many (instead of --holdout's exact count):
    /// the largest hold-out the examples allow, without counting them first
    #[arg(long, conflicts_with = "holdout")]
    pub holdout_max: Option<usize>,
}

/// The examples of a search: its shots, the held-out ones, and where they came from.
struct Examples {
    area: String,
    shots: Vec<TaskItem>,
    held_out: Vec<TaskItem>,
    source: String,
}

fn load_examples(a: &AdaptArgs) -> Result<Examples> {
    let path = Path::new(&a.task);
    let (area, items, source) = if path.is_file() {
        let items = t2_tasks::shots::read_examples(path).map_err(anyhow::Error::msg)?;
        ("custom".to_string(), items, path.display().to_string())
    } else if a.task.ends_with(".jsonl") || a.task.contains('/') {
        bail!("few-shot file not found: {}", a.task);
    } else {
        let task = t2_tasks::Task::open(&a.data, &a.task)?;
        // An unseen task may ship without a training split (arc_challenge): its validation split is the
        // next place shots may come from; the test split never is.
        let (items, split) = match task.items(Split::Train) {
            Ok(items) => (items, Split::Train),
            Err(t2_tasks::TaskError::NoSplit { .. }) => (task.items(Split::Val)?, Split::Val),
            Err(e) => return Err(e.into()),
        };
        (
            task.info.area.clone(),
            items,
            format!("{} ({} split)", a.task, split.as_str()),
        )
    };
    if a.shots == 0 {
        bail!("--shots must be at least 1");
    }
    let holdout = match a.holdout_max {
        Some(max) => {
            let rest = items.len().saturating_sub(a.shots);
            if max > 0 && rest == 0 {
                bail!(
                    "too few examples: {source} has {}, and --shots takes them all, leaving none for --holdout-max",
                    items.len()
                );
            }
            rest.min(max)
        }
        None => a.holdout,
    };
    if items.len() < a.shots + holdout {
        bail!(
            "too few examples: {source} has {}, and --shots with --holdout asks for {}",
            items.len(),
            a.shots + holdout
        );
    }
    // The shots are what `--shots` alone draws, so a search saved without a hold-out goes on with one.
    let (shots, held_out) = t2_adapt::eval::subset_and_next(&items, a.shots, holdout);
    Ok(Examples {
        area,
        shots,
        held_out,
        source,
    })
}

pub fn run(a: AdaptArgs) -> Result<()> {
    t2_svf::expert::check_name(&a.name)?;
    let Examples {
        area,
        shots,
        held_out,
        source,
    } = load_examples(&a)?;
    if a.likelihood {
        cem::right_options(&shots)?;
        cem::right_options(&held_out)?;
    }
    let engine = Arc::new(open_engine(&a.model, &a.svf, true)?);
    let store = engine.experts.as_ref().context("SVF is off")?;
    if store.get(&a.name).is_ok() {
        bail!(
            "'{}' is already an expert's name; choose another name for the mix",
            a.name
        );
    }
    let experts = if a.experts.is_empty() {
        cem::mixable_experts(&engine)
    } else {
        for e in &a.experts {
            store.get(e)?;
        }
        a.experts.clone()
    };
    let cfg = CemConfig {
        population: a.population,
        elites: a.elites,
        iterations: a.iterations,
        init_std: a.init_std,
        seed: a.seed,
        max_new_tokens: a
            .max_new_tokens
            .unwrap_or_else(|| t2_adapt::eval::default_max_tokens(&shots)),
        experts,
        likelihood: a.likelihood,
        sparsity_prior: !a.no_sparsity_prior,
    };
    cfg.check()?;
    let start = match &a.state {
        Some(p) if p.exists() => load_state(p, &cfg, &shots)?,
        _ => cem::CemState::start(&cfg),
    };
    let answerer = Answerer::new(engine.clone(), a.batch)?;
    eprintln!(
        "few-shot search over {} ({} experts) on {} examples of {source}: {} iterations × {} candidates",
        cfg.experts.join(", "),
        cfg.experts.len(),
        shots.len(),
        cfg.iterations,
        cfg.population
    );
    let mut comparison = None;
    if a.compare_sequential {
        let alphas = cem::first_population(&cfg);
        let t = std::time::Instant::now();
        let adaptations: Vec<_> = alphas
            .iter()
            .map(|x| t2_engine::Adaptation::Mix(cem::mix_of(&cfg.experts, x)))
            .collect();
        let batched =
            answerer.evaluate_population(&area, &shots, &adaptations, cfg.max_new_tokens)?;
        let batched_s = t.elapsed().as_secs_f64();
        let (seq_acc, seq) = cem::evaluate_sequentially(&answerer, &area, &shots, &cfg, &alphas)?;
        let batched_acc: Vec<f64> = batched.iter().map(|r| r.accuracy()).collect();
        let same = batched_acc == seq_acc;
        eprintln!(
            "population of {}: batched {batched_s:.1} s, one candidate after another {:.1} s ({:.2}× faster \
             batched); same accuracies: {same}",
            alphas.len(),
            seq.as_secs_f64(),
            seq.as_secs_f64() / batched_s
        );
        comparison = Some(serde_json::json!({
            "candidates": alphas.len(),
            "batched_seconds": batched_s,
            "sequential_seconds": seq.as_secs_f64(),
            "speedup": seq.as_secs_f64() / batched_s,
            "same_accuracies": same,
        }));
    }
    if !start.history.is_empty() {
        eprintln!(
            "going on from iteration {} of the saved search in {}",
            start.history.len() + 1,
            a.state.as_ref().expect("loaded from it").display()
        );
    }
    let mut outcome = cem::search_from(&answerer, &area, &shots, &cfg, start, |st| {
        if let Some(p) = &a.state {
            if let Err(e) = save_state(p, &cfg, &shots, st) {
                eprintln!("could not save the search state: {e:#}");
                return false;
            }
        }
        let it = st.history.last().expect("called after an iteration");
        eprintln!(
            "iteration {:>3}/{}: best {:.2}{} | best so far {:.2} | population mean {:.2} | α mean [{}] | {:.1} s",
            it.iteration + 1,
            cfg.iterations,
            it.best.accuracy,
            it.best
                .loglik
                .map(|l| format!(" (ll {l:.3})"))
                .unwrap_or_default(),
            it.best_so_far.accuracy,
            it.mean_accuracy,
            it.mean
                .iter()
                .map(|m| format!("{m:.2}"))
                .collect::<Vec<_>>()
                .join(" "),
            it.eval_seconds
        );
        true
    })?;
    t2_adapt::holdout::apply(&answerer, &area, &shots, &held_out, &cfg, &mut outcome)?;
    if let Some(choice) = &outcome.holdout {
        println!(
            "| contender | on the {} shots | on the {} held-out examples |\n|---|---|---|",
            shots.len(),
            held_out.len()
        );
        for (i, c) in choice.contenders.iter().enumerate() {
            let mark = if i == choice.chosen { " (chosen)" } else { "" };
            println!(
                "| {}{mark} | {:.1}% | {:.1}% |",
                c.label,
                100.0 * c.shots.accuracy,
                100.0 * c.holdout.accuracy
            );
        }
        println!();
    }
    println!("| expert | α |\n|---|---|");
    for (e, w) in &outcome.mix.weights() {
        println!("| {e} | {w:.3} |");
    }
    println!(
        "\nscore on the {} examples: {:.1}% after {} iterations ({} answers, {:.0} s)",
        shots.len(),
        100.0 * outcome.best.accuracy,
        outcome.history.len(),
        outcome.generations,
        outcome.seconds
    );
    if let Some(p) = &a.json {
        let doc = serde_json::json!({
            "name": a.name,
            "source": source,
            "config": cfg,
            "outcome": outcome,
            "batched_vs_sequential": comparison,
        });
        std::fs::write(p, serde_json::to_string_pretty(&doc)?)
            .with_context(|| p.display().to_string())?;
    }
    if a.no_save {
        return Ok(());
    }
    let mix = cem::stored_mix(
        &a.name,
        &outcome,
        &cfg,
        &source,
        shots.len(),
        &crate::train_cmd::command_line(),
    );
    store.save_mix(mix)?;
    println!(
        "stored mix '{}' in {}: use model {}:{}",
        a.name,
        store.dir.display(),
        engine.loaded.model_id,
        a.name
    );
    Ok(())
}

/// What a saved state must match to be gone on with: the settings and the shots.
fn search_identity(cfg: &CemConfig, shots: &[TaskItem]) -> serde_json::Value {
    let ids: Vec<&str> = shots.iter().map(|s| s.id.as_str()).collect();
    serde_json::json!({ "config": cfg, "shots": ids })
}

fn save_state(path: &Path, cfg: &CemConfig, shots: &[TaskItem], st: &cem::CemState) -> Result<()> {
    let doc = serde_json::json!({ "search": search_identity(cfg, shots), "state": st });
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_string(&doc)?)
        .with_context(|| tmp.display().to_string())?;
    // Renamed into place: a stop mid-write leaves the previous state whole.
    std::fs::rename(&tmp, path).with_context(|| path.display().to_string())
}

fn load_state(path: &Path, cfg: &CemConfig, shots: &[TaskItem]) -> Result<cem::CemState> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    let mut doc: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a search state", path.display()))?;
    // The iteration count may grow on resume; everything else must match.
    let mut saved = doc["search"].take();
    let mut now = search_identity(cfg, shots);
    saved["config"]["iterations"] = serde_json::Value::Null;
    now["config"]["iterations"] = serde_json::Value::Null;
    if saved != now {
        bail!(
            "{} holds a search with other settings or shots; remove it or pass another --state",
            path.display()
        );
    }
    serde_json::from_value(doc["state"].take())
        .with_context(|| format!("{}: not a search state", path.display()))
}
