//! Decomposition cache and expert files on a small random model: round trips, and every kind of bad
//! input rejected with a clear error.

use candle_core::{DType, Device};
use t2_model::{random_llama, Llama, LlamaConfig};
use t2_svf::decompose::Origin;
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
