//! Decomposition cache and expert files on a small random model: round trips, and every kind of bad
//! input rejected with a clear error.

use candle_core::{DType, Device};
use t2_model::{random_llama, Llama, LlamaConfig};
use t2_svf::decompose::{CacheDtype, CacheOptions, MatrixSource, Origin};
use t2_svf::{Decomposition, Expert, ExpertMeta, ExpertStore, SvfError, TargetSet};

const SHA: &str = "0123456789abcdef";

fn model() -> Llama {
    random_llama(&LlamaConfig::tiny(), DType::F32, &Device::Cpu, 5).unwrap()
}

fn meta(d: &Decomposition, name: &str) -> ExpertMeta {
    ExpertMeta {
        name: name.into(),
        description: "test".into(),
        category: "math".into(),
        model_id: "tiny".into(),
        decomposition_hash: d.hash.clone(),
        targets: TargetSet::All,
        provenance: Default::default(),
    }
}

#[test]
fn cache_round_trip_and_warm_start() {
    let m = model();
    let dir = tempfile::tempdir().unwrap();
    let model_path = dir.path().join("tiny.gguf");
    let (d, origin) =
        Decomposition::load_or_compute(&model_path, &m, SHA, TargetSet::All, false).unwrap();
    assert!(matches!(origin, Origin::Computed { rejected: None, .. }));
    assert!(d.max_rel_error() <= 1e-5);
    let (d2, origin) =
        Decomposition::load_or_compute(&model_path, &m, SHA, TargetSet::All, false).unwrap();
    assert!(matches!(origin, Origin::Loaded(_)));
    assert_eq!(d2.hash, d.hash);
    for (id, f) in &d.factors {
        assert_eq!(f.sigma_host, d2.factors[id].sigma_host);
    }
    // a narrower target set is served from the wider cache
    let (d3, origin) =
        Decomposition::load_or_compute(&model_path, &m, SHA, TargetSet::Mlp, false).unwrap();
    assert!(matches!(origin, Origin::Loaded(_)));
    assert_eq!(d3.factors.len(), 2 * 3);
    // no temp files left behind
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty());
}

#[test]
fn damaged_stale_or_truncated_cache_is_rejected_and_rebuilt() {
    let m = model();
    let dir = tempfile::tempdir().unwrap();
    let model_path = dir.path().join("tiny.gguf");
    let cache = Decomposition::cache_path(&model_path, TargetSet::All);
    Decomposition::load_or_compute(&model_path, &m, SHA, TargetSet::All, false).unwrap();

    // flip one byte in the data section
    let mut bytes = std::fs::read(&cache).unwrap();
    let n = bytes.len();
    bytes[n - 10] ^= 0x55;
    std::fs::write(&cache, &bytes).unwrap();
    let err = Decomposition::load(&cache, &m, SHA)
        .err()
        .expect("damaged cache must be refused");
    assert!(err.to_string().contains("checksum"), "{err}");
    let (_, origin) =
        Decomposition::load_or_compute(&model_path, &m, SHA, TargetSet::All, false).unwrap();
    assert!(
        matches!(
            origin,
            Origin::Computed {
                rejected: Some(_),
                ..
            }
        ),
        "{origin:?}"
    );
    assert!(
        Decomposition::load(&cache, &m, SHA).is_ok(),
        "the rebuilt cache is valid"
    );

    // other weights
    let err = Decomposition::load(&cache, &m, "another-sha")
        .err()
        .unwrap();
    assert!(err.to_string().contains("other weights"), "{err}");

    // truncated
    let bytes = std::fs::read(&cache).unwrap();
    std::fs::write(&cache, &bytes[..bytes.len() / 2]).unwrap();
    assert!(matches!(
        Decomposition::load(&cache, &m, SHA),
        Err(SvfError::BadCache { .. })
    ));
}

#[test]
fn expert_round_trip_and_store() {
    let m = model();
    let d = Decomposition::compute(&m, SHA, TargetSet::All, false).unwrap();
    let root = tempfile::tempdir().unwrap();
    let mut store = ExpertStore::open(root.path(), "tiny", &d).unwrap();
    assert!(store.names().is_empty());
    let mut e = Expert::constant(meta(&d, "math"), &d, 0.5);
    e.z.values_mut().next().unwrap()[0] = 0.9;
    store.add(e.clone(), &d).unwrap();
    let reopened = ExpertStore::open(root.path(), "tiny", &d).unwrap();
    assert_eq!(reopened.names(), vec!["math".to_string()]);
    assert_eq!(reopened.get("math").unwrap().z, e.z);
    assert_eq!(reopened.get("math").unwrap().meta, e.meta);
    let err = reopened.get("code").err().unwrap().to_string();
    assert!(
        err.contains("unknown expert 'code'") && err.contains("math"),
        "{err}"
    );
}

#[test]
fn invalid_experts_are_rejected_with_clear_errors() {
    let m = model();
    let d = Decomposition::compute(&m, SHA, TargetSet::All, false).unwrap();
    let check = |e: &Expert, needle: &str| {
        let err = e
            .validate(&d, "tiny")
            .err()
            .unwrap_or_else(|| panic!("expected an error mentioning {needle}"));
        assert!(
            err.to_string().contains(needle),
            "{err} should mention {needle}"
        );
    };
    let good = Expert::constant(meta(&d, "ok"), &d, 0.5);
    good.validate(&d, "tiny").unwrap();

    let mut e = good.clone();
    e.meta.model_id = "other".into();
    check(&e, "made for model 'other'");

    let mut e = good.clone();
    e.meta.decomposition_hash = "deadbeef".into();
    check(&e, "decomposition");

    let mut e = good.clone();
    e.z.values_mut().next().unwrap().pop();
    check(&e, "length");

    let mut e = good.clone();
    e.z.values_mut().next().unwrap()[3] = f32::NAN;
    check(&e, "non-finite");

    let mut e = good.clone();
    e.z.values_mut()
        .next()
        .unwrap()
        .iter_mut()
        .for_each(|v| *v = 0.0);
    check(&e, "Σ(σ⊙z) ≈ 0");

    let mut e = good.clone();
    e.meta.targets = TargetSet::Mlp;
    check(&e, "outside its target set");

    // a file that is not an expert at all
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("junk.safetensors");
    std::fs::write(&p, b"not a safetensors file").unwrap();
    assert!(Expert::load(&p)
        .err()
        .unwrap()
        .to_string()
        .contains("unreadable"));
}

fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// ‖U·diag(σ)·Vᵀ − W‖_F / ‖W‖_F recomputed from loaded factors (in f32).
fn reconstruction_error(m: &Llama, d: &Decomposition) -> f64 {
    let mut worst = 0f64;
    for (id, f) in &d.factors {
        let w = m.linear(*id).unwrap().weight().unwrap();
        let us = f
            .u()
            .unwrap()
            .broadcast_mul(&f.sigma.unsqueeze(0).unwrap())
            .unwrap();
        let rec = us.matmul(f.vt().unwrap()).unwrap();
        let fro = |t: &candle_core::Tensor| {
            t.sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64
        };
        let err = (fro(&(&rec - w).unwrap()) / fro(w)).sqrt();
        worst = worst.max(err);
    }
    worst
}

#[test]
fn streaming_cache_matches_in_memory_decomposition() {
    let m = model();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stream.safetensors");
    let opts = CacheOptions {
        workers: Some(3),
        ..CacheOptions::new(TargetSet::All, CacheDtype::F32)
    };
    let summary = Decomposition::compute_to_file(&m, SHA, &opts, &path, false).unwrap();
    assert_eq!(summary.matrices.len(), 2 * 7);
    assert_eq!(summary.bytes, std::fs::metadata(&path).unwrap().len());
    let streamed = Decomposition::load(&path, &m, SHA).unwrap();
    let memory = Decomposition::compute(&m, SHA, TargetSet::All, false).unwrap();
    assert_eq!(streamed.hash, memory.hash);
    assert_eq!(streamed.factors.len(), memory.factors.len());
    for (id, f) in &memory.factors {
        let g = &streamed.factors[id];
        assert_eq!(f.sigma_host, g.sigma_host, "{}", id.name());
        assert_eq!(
            max_abs_diff(f.u().unwrap(), g.u().unwrap()),
            0.0,
            "{}",
            id.name()
        );
        assert_eq!(
            max_abs_diff(f.vt().unwrap(), g.vt().unwrap()),
            0.0,
            "{}",
            id.name()
        );
        assert!(
            (f.rel_error - g.rel_error).abs() <= 1e-12 * f.rel_error,
            "{}",
            id.name()
        );
    }
    // the in-memory save writes the same format, readable the same way
    let saved = dir.path().join("saved.safetensors");
    memory.save(&saved).unwrap();
    let again = Decomposition::load(&saved, &m, SHA).unwrap();
    assert_eq!(again.factors.len(), memory.factors.len());
}

#[test]
fn bf16_cache_round_trips_within_tolerance_and_halves_the_file() {
    let m = model();
    let dir = tempfile::tempdir().unwrap();
    let model_path = dir.path().join("tiny.gguf");
    let opts = CacheOptions::new(TargetSet::All, CacheDtype::Bf16);
    let (d, origin) =
        Decomposition::load_or_compute_with(&model_path, &m, SHA, &opts, false).unwrap();
    let bf16_path = Decomposition::cache_path_for(&model_path, TargetSet::All, CacheDtype::Bf16);
    assert_eq!(
        origin,
        Origin::Computed {
            saved_to: bf16_path.clone(),
            rejected: None
        }
    );
    // Recorded (f64) and recomputed (f32) reconstruction errors: bf16 rounding of U and Vᵀ, well under 1e-2.
    let recorded = d.max_rel_error();
    let recomputed = reconstruction_error(&m, &d);
    assert!(recorded > 1e-4 && recorded < 5e-3, "{recorded}");
    assert!(
        (recomputed - recorded).abs() < 1e-4,
        "{recomputed} vs {recorded}"
    );
    // the f32 cache reconstructs to 1e-5
    let (f, _) =
        Decomposition::load_or_compute(&model_path, &m, SHA, TargetSet::All, false).unwrap();
    assert!(reconstruction_error(&m, &f) < 1e-5);
    // σ is kept in f32: identical in both
    for (id, g) in &f.factors {
        assert_eq!(g.sigma_host, d.factors[id].sigma_host);
    }
    let size = |p: &std::path::Path| std::fs::metadata(p).unwrap().len() as f64;
    let ratio = size(&bf16_path) / size(&Decomposition::cache_path(&model_path, TargetSet::All));
    assert!(ratio > 0.45 && ratio < 0.6, "{ratio}");
    // warm start from the bf16 cache
    let (_, origin) =
        Decomposition::load_or_compute_with(&model_path, &m, SHA, &opts, false).unwrap();
    assert_eq!(origin, Origin::Loaded(bf16_path));
}

#[test]
fn mlp_only_cache_holds_only_mlp_matrices() {
    let m = model();
    for dtype in [CacheDtype::F32, CacheDtype::Bf16] {
        // a folder each: an f32 cache would serve a bf16 request
        let dir = tempfile::tempdir().unwrap();
        let model_path = dir.path().join("tiny.gguf");
        let opts = CacheOptions::new(TargetSet::Mlp, dtype);
        let (d, _) =
            Decomposition::load_or_compute_with(&model_path, &m, SHA, &opts, false).unwrap();
        assert_eq!(d.targets, TargetSet::Mlp);
        assert_eq!(d.factors.len(), 2 * 3);
        assert!(d.factors.keys().all(|id| TargetSet::Mlp.contains(id.kind)));
        let path = Decomposition::cache_path_for(&model_path, TargetSet::Mlp, dtype);
        let bytes = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let names = st.names();
        assert_eq!(names.len(), 2 * 3 * 3);
        for n in names {
            let matrix = n.rsplit_once('.').unwrap().0;
            let id = t2_model::ProjId::parse(matrix).unwrap();
            assert!(TargetSet::Mlp.contains(id.kind), "{n}");
        }
        // an mlp cache cannot serve all targets: a wider request decomposes anew
        let (_, origin) = Decomposition::load_or_compute_with(
            &model_path,
            &m,
            SHA,
            &CacheOptions::new(TargetSet::All, dtype),
            false,
        )
        .unwrap();
        assert!(matches!(origin, Origin::Computed { .. }));
    }
}

#[test]
fn streaming_from_the_checkpoint_file_equals_streaming_from_the_resident_model() {
    let m = model();
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    std::fs::create_dir(&ckpt).unwrap();
    std::fs::write(ckpt.join("config.json"), "{}").unwrap();
    let tensors: Vec<(String, candle_core::Tensor)> = m
        .linears()
        .map(|l| {
            let part = if t2_model::ProjKind::MLP.contains(&l.id.kind) {
                "mlp"
            } else {
                "self_attn"
            };
            (
                format!(
                    "model.layers.{}.{part}.{}.weight",
                    l.id.layer,
                    l.id.kind.name()
                ),
                l.weight().unwrap().clone(),
            )
        })
        .collect();
    candle_core::safetensors::save(
        &tensors.iter().cloned().collect(),
        ckpt.join("model.safetensors"),
    )
    .unwrap();
    let source = t2_svf::checkpoint::CheckpointMatrices::open(&ckpt).unwrap();
    assert_eq!(source.matrices().len(), 2 * 7);
    assert_eq!(
        source.weights_sha256,
        t2_model::load::weights_sha256(&ckpt).unwrap()
    );
    for dtype in [CacheDtype::F32, CacheDtype::Bf16] {
        let opts = CacheOptions::new(TargetSet::All, dtype);
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        Decomposition::compute_to_file(&source, SHA, &opts, &a, false).unwrap();
        Decomposition::compute_to_file(&m, SHA, &opts, &b, false).unwrap();
        assert!(std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap());
        // checked without loading the factors, and loadable for the resident model
        let s = Decomposition::verify(&a, &source, SHA).unwrap();
        assert_eq!((s.matrices.len(), s.dtype), (2 * 7, dtype));
        assert!(Decomposition::verify(&a, &source, "other").is_err());
        Decomposition::load(&a, &m, SHA).unwrap();
    }
}

#[test]
fn a_server_asks_for_bf16_factors_only_where_they_end_up_in_bf16() {
    use t2_model::BaseWeights;
    let pick = CacheDtype::for_weights;
    assert_eq!(pick(DType::BF16, BaseWeights::Dense), CacheDtype::Bf16);
    assert_eq!(pick(DType::F32, BaseWeights::BF16), CacheDtype::Bf16);
    // f32 factors stay f32; f16 ones keep the two mantissa bits a bf16 cache would lose
    for base in [BaseWeights::Dense, BaseWeights::F16, BaseWeights::Q8] {
        assert_eq!(pick(DType::F32, base), CacheDtype::F32);
    }
    assert_eq!(pick(DType::F16, BaseWeights::Dense), CacheDtype::F32);
}
