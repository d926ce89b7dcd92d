//! Shared by the integration tests: the real default model, loaded once per test binary.
#![allow(dead_code)] // each test binary uses its own subset

use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::{DType, Device};
use t2_engine::{Engine, EngineConfig};
use t2_svf::{Expert, ExpertMeta};

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn model_path() -> PathBuf {
    let p = repo_root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.exists(),
        "the default model is missing: run `bash scripts/fetch-model.sh` first ({})",
        p.display()
    );
    p
}

/// The default model in f32 with the `all` decomposition (computed and cached beside the model on first use)
/// and an empty expert store.
pub fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let experts = tempfile::tempdir().expect("tempdir").keep();
        let cfg = EngineConfig {
            experts_dir: experts,
            device: Device::Cpu,
            dtype: DType::F32,
            ..EngineConfig::new(model_path())
        };
        Engine::open(&cfg).expect("engine opens")
    })
}

/// Largest |a-b| relative to the largest |b|.
pub fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-12);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// The default model in f32 with seeded random experts, given as (name, category, seed), in a fresh store.
pub fn engine_with_random_experts(experts: &[(&str, &str, u64)], mix_capacity: usize) -> Engine {
    let cfg = EngineConfig {
        experts_dir: tempfile::tempdir().unwrap().keep(),
        device: Device::Cpu,
        dtype: DType::F32,
        mix_capacity,
        ..EngineConfig::new(model_path())
    };
    let mut e = Engine::open(&cfg).unwrap();
    let svf = e.svf.as_ref().unwrap();
    let made: Vec<Expert> = experts
        .iter()
        .map(|&(name, category, seed)| {
            let meta = ExpertMeta {
                name: name.into(),
                description: "test".into(),
                category: category.into(),
                model_id: e.loaded.model_id.clone(),
                decomposition_hash: svf.decomp.hash.clone(),
                targets: svf.decomp.targets,
                provenance: Default::default(),
            };
            Expert::random(meta, &svf.decomp, seed, 0.5)
        })
        .collect();
    let (svf, store) = (e.svf.as_ref().unwrap(), e.experts.as_mut().unwrap());
    for x in made {
        store.add(x, &svf.decomp).unwrap();
    }
    e
}
