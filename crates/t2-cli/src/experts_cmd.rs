use anyhow::Result;
use clap::Subcommand;

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
            for m in &store.manifest.mixes {
                let alpha: Vec<String> = m.alpha.iter().map(|(k, v)| format!("{k}={v}")).collect();
                println!("  mix {:<12} {}", m.name, alpha.join(","));
            }
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
