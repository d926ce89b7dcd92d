//! A shipped expert's training command reproduces it: re-running the first steps of its recorded
//! configuration gives the loss trace recorded beside it (the shipped run was made on another machine).

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device};
use t2_engine::{Engine, EngineConfig};
use t2_svf::Expert;
use t2_train::{read_log, RunOptions, TrainConfig, Trainer};

const EXPERT: &str = "sentiment";
const STEPS: usize = 2;

#[test]
fn shipped_expert_reproduces_its_loss_trace() {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let store = repo.join("experts/SmolLM2-135M-Instruct");
    let expert = Expert::load(&store.join(format!("{EXPERT}.safetensors"))).unwrap();
    let cfg: TrainConfig = serde_json::from_str(&expert.meta.provenance["config"]).unwrap();
    let shipped = read_log(&store.join(format!("{EXPERT}.log.csv"))).unwrap();
    assert!(shipped.len() > STEPS, "the shipped log is too short");

    let model = repo.join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(model.exists(), "run `bash scripts/fetch-model.sh` first");
    let engine = Engine::open(&EngineConfig {
        experts_dir: tempfile::tempdir().unwrap().keep(),
        device: Device::Cpu,
        dtype: DType::F32,
        ..EngineConfig::new(model)
    })
    .unwrap();
    let trainer = Trainer::new(Arc::new(engine), 32).unwrap();
    let out = tempfile::tempdir().unwrap();
    let opts = RunOptions {
        data_dir: repo.join("data/tasks"),
        out_dir: out.path().to_path_buf(),
        experts_dir: None,
        resume: false,
        stop_after: Some(STEPS),
        progress: false,
        command: "test".into(),
    };
    let run = trainer.train(&cfg, &opts).unwrap();
    assert_eq!(run.log.len(), STEPS + 1);
    for (mine, theirs) in run.log.iter().zip(&shipped) {
        assert_eq!(mine.step, theirs.step);
        // The log keeps 4 decimals of accuracies and 6 of the loss.
        match (mine.val_acc, theirs.val_acc) {
            (Some(a), Some(b)) => assert!(
                (a - b).abs() < 1e-4,
                "step {}: validation {a} vs shipped {b}",
                mine.step
            ),
            (a, b) => assert_eq!(a, b, "step {}: validation", mine.step),
        }
        if mine.step == 0 {
            continue;
        }
        assert_eq!(
            mine.train_acc, theirs.train_acc,
            "step {}: rollout rewards differ",
            mine.step
        );
        assert!(
            (mine.loss - theirs.loss).abs() < 1e-4,
            "step {}: loss {} vs shipped {}",
            mine.step,
            mine.loss,
            theirs.loss
        );
        assert!(
            (mine.grad_norm - theirs.grad_norm).abs() <= 1e-3 * theirs.grad_norm,
            "step {}: gradient norm {} vs shipped {}",
            mine.step,
            mine.grad_norm,
            theirs.grad_norm
        );
    }
}
