use anyhow::{bail, Result};
use clap::Subcommand;
use t2_svf::expert::{Expert, ExpertMeta, StoredMix};
use t2_svf::mix::parse_mix;

use crate::common::{open_engine, ModelArgs, SvfArgs};

#[derive(Subcommand, Debug)]
pub enum ExpertsCmd {
    /// The experts and stored mixes of the model
    List {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        svf: SvfArgs,
    },
    /// Write a seeded random (untrained) expert: for testing and benchmarking the serving paths
    Synth {
        /// Expert name (used in model ids as `<base>:<name>`)
        #[arg(long)]
        name: String,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// z is drawn uniformly from [1 - strength, 1 + strength]
        #[arg(long, default_value_t = 0.2)]
        strength: f32,
        #[arg(long, default_value = "other")]
        category: String,
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        svf: SvfArgs,
    },
    /// Store a named mix of existing experts, e.g. --mix "math=0.7,code=0.3"
    SaveMix {
        #[arg(long)]
        name: String,
        #[arg(long)]
        mix: String,
        #[arg(long, default_value = "")]
        description: String,
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        svf: SvfArgs,
    },
    /// Add a trained expert file (e.g. a training run's output) to the store, checked against the model
    /// and its decomposition; its provenance (training command, steps, validation) goes into the manifest
    Install {
        /// The expert's .safetensors file
        file: std::path::PathBuf,
        /// Store it under this name [default: the name inside the file]
        #[arg(long)]
        name: Option<String>,
        /// Install it turned down to strength t in (0, 1]: z becomes t·z + (1 - t), the mix
        /// `name=t,base=1-t` stored as one expert (the strength is kept in its provenance)
        #[arg(long, default_value_t = 1.0)]
        strength: f32,
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        svf: SvfArgs,
    },
    /// Per-matrix statistics of one expert's z vectors
    Inspect {
        name: String,
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        svf: SvfArgs,
    },
}

pub fn run(cmd: ExpertsCmd) -> Result<()> {
    match cmd {
        ExpertsCmd::List { model, svf } => {
            let engine = open_engine(&model, &svf, true)?;
            let store = engine.experts.as_ref().expect("svf engine has a store");
            println!(
                "experts of {} ({}):",
                engine.loaded.model_id,
                store.dir.display()
            );
            if store.names().is_empty() {
                println!("  (none)");
            }
            println!(
                "  {:<16} {:<10} {:<6} description",
                "name", "category", "targets"
            );
            for e in store.experts() {
                println!(
                    "  {:<16} {:<10} {:<6} {}",
                    e.meta.name, e.meta.category, e.meta.targets, e.meta.description
                );
            }
            for m in &store.mixes() {
                let alpha: Vec<String> = m
                    .mix
                    .weights()
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                println!("  mix {:<12} {}", m.name, alpha.join(","));
            }
            Ok(())
        }
        ExpertsCmd::Synth {
            name,
            seed,
            strength,
            category,
            model,
            svf,
        } => {
            if !(strength.is_finite() && (0.0..1.0).contains(&strength)) {
                bail!("--strength must be in [0, 1), got {strength}");
            }
            let mut engine = open_engine(&model, &svf, true)?;
            let svf_p = engine.svf.as_ref().expect("svf engine has a decomposition");
            let meta = ExpertMeta {
                name: name.clone(),
                description: format!("random test expert (seed {seed}, strength {strength})"),
                category,
                model_id: engine.loaded.model_id.clone(),
                decomposition_hash: svf_p.decomp.hash.clone(),
                targets: svf_p.decomp.targets,
                provenance: Default::default(),
            };
            let expert = Expert::random(meta, &svf_p.decomp, seed, strength);
            let decomp = &engine.svf.as_ref().expect("checked").decomp;
            let store = engine.experts.as_mut().expect("svf engine has a store");
            store.add(expert, decomp)?;
            println!("wrote expert '{name}' to {}", store.dir.display());
            Ok(())
        }
        ExpertsCmd::SaveMix {
            name,
            mix,
            description,
            model,
            svf,
        } => {
            let mix = parse_mix(&mix)?;
            let engine = open_engine(&model, &svf, true)?;
            let store = engine.experts.as_ref().expect("svf engine has a store");
            store.save_mix(StoredMix {
                name: name.clone(),
                mix,
                description,
                provenance: [("made_by".to_string(), "t2 experts save-mix".to_string())].into(),
            })?;
            println!("stored mix '{name}' in {}", store.dir.display());
            Ok(())
        }
        ExpertsCmd::Install {
            file,
            name,
            strength,
            model,
            svf,
        } => {
            if !(strength.is_finite() && strength > 0.0 && strength <= 1.0) {
                bail!("--strength must be in (0, 1], got {strength}");
            }
            let mut expert = Expert::load(&file)?.at_strength(strength)?;
            if let Some(name) = name {
                expert.meta.name = name;
            }
            let name = expert.meta.name.clone();
            let mut engine = open_engine(&model, &svf, true)?;
            let decomp = &engine
                .svf
                .as_ref()
                .expect("svf engine has a decomposition")
                .decomp;
            let store = engine.experts.as_mut().expect("svf engine has a store");
            // `add` validates against the model and decomposition before anything is written.
            store.add(expert, decomp)?;
            let at = if strength == 1.0 {
                String::new()
            } else {
                format!(" at strength {strength}")
            };
            println!(
                "installed '{name}'{at} from {} into {}",
                file.display(),
                store.dir.display()
            );
            Ok(())
        }
        ExpertsCmd::Inspect { name, model, svf } => {
            let engine = open_engine(&model, &svf, true)?;
            let store = engine.experts.as_ref().expect("svf engine has a store");
            let e = store.get(&name)?;
            println!(
                "{}: {} (category {}, targets {}, model {}, decomposition {})",
                e.meta.name,
                e.meta.description,
                e.meta.category,
                e.meta.targets,
                e.meta.model_id,
                e.meta.decomposition_hash
            );
            // How it was made (the training command reproduces it); the full config is long, so last.
            let mut prov: Vec<_> = e
                .meta
                .provenance
                .iter()
                .filter(|(k, _)| *k != "config")
                .collect();
            prov.extend(e.meta.provenance.iter().filter(|(k, _)| *k == "config"));
            for (k, v) in prov {
                println!("  {k}: {v}");
            }
            println!(
                "{:<28} {:>6} {:>9} {:>9} {:>9}",
                "matrix", "len", "min", "mean", "max"
            );
            let mut total = 0;
            for (id, z) in &e.z {
                let min = z.iter().copied().fold(f32::INFINITY, f32::min);
                let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mean = z.iter().sum::<f32>() / z.len() as f32;
                total += z.len();
                println!(
                    "{:<28} {:>6} {:>9.4} {:>9.4} {:>9.4}",
                    id.name(),
                    z.len(),
                    min,
                    mean,
                    max
                );
            }
            println!("{total} numbers");
            Ok(())
        }
    }
}
