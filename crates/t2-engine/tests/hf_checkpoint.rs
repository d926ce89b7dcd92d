//! The same weights loaded from an HF folder (config.json + safetensors + tokenizer.json, q/k in the
//! original "rotate half" layout) must give the same logits as the GGUF: this checks the HF loader, the
//! q/k row permutation and both RoPE layouts against each other.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use t2_engine::{Engine, EngineConfig};
use t2_model::{
    export::export_hf, ChatMessage, DenseProjector, LoadedModel, ModelSource, RopeScaling,
    RopeStyle, SeqStep, WantLogits,
};
use t2_svf::decompose::{CacheDtype, Origin};
use t2_svf::{Decomposition, TargetSet};

#[test]
fn hf_folder_matches_gguf() {
    let gguf = LoadedModel::load(&common::model_path(), &Device::Cpu, DType::F32).unwrap();
    let dir = tempfile::tempdir().unwrap();
    export_hf(&gguf, dir.path()).unwrap();
    let hf = LoadedModel::load(dir.path(), &Device::Cpu, DType::F32).unwrap();
    assert_eq!(hf.source, ModelSource::HfDir(dir.path().to_path_buf()));
    assert_eq!(hf.model.cfg.rope_style, RopeStyle::Half);
    assert_eq!(gguf.model.cfg.rope_style, RopeStyle::Interleaved);

    let msgs = [ChatMessage::new(
        "user",
        "Why is the sky blue? Answer in 12 words.",
    )];
    let text = gguf.template.render(&msgs).unwrap();
    assert_eq!(hf.template.render(&msgs).unwrap(), text);
    let tokens = gguf.tokenizer.encode(&text).unwrap();
    assert_eq!(hf.tokenizer.encode(&text).unwrap(), tokens);
    assert_eq!(hf.tokenizer.eos, gguf.tokenizer.eos);

    let logits = |m: &LoadedModel| -> Vec<f32> {
        let (pool, mut kv) = m.model.pool_for(&[tokens.len()]).unwrap();
        m.model
            .forward(
                &mut [SeqStep {
                    kv: &mut kv[0],
                    tokens: &tokens,
                    mix: 0,
                    want: WantLogits::Last,
                }],
                &DenseProjector,
                &pool,
            )
            .unwrap()[0]
            .as_ref()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let d = common::rel_diff(&logits(&hf), &logits(&gguf));
    assert!(d < 1e-5, "HF vs GGUF logits differ by {d}");
}

// ---- Model families against an independent reference ----
//
// crates/t2-model/tests/fixtures/families/<family>/ holds a small HF checkpoint with seeded random weights
// and reference.json: candle-transformers' logits for the same weights (CPU, f32) after a prompt and after
// each of a few decode steps. The generator is tools/family-fixtures (not built by CI); its command is in
// each reference.json.

const FAMILIES: [&str; 4] = ["llama3", "qwen2", "qwen3", "mistral"];
const TOLERANCE: f32 = 1e-4;

fn family_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../t2-model/tests/fixtures/families")
        .join(name)
}

struct Reference {
    prompt: Vec<u32>,
    decode: Vec<u32>,
    /// After the prompt, then after each decode token.
    logits: Vec<Vec<f32>>,
}

fn reference(name: &str) -> Reference {
    let text = std::fs::read_to_string(family_dir(name).join("reference.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let ids = |k: &str| -> Vec<u32> { serde_json::from_value(v[k].clone()).unwrap() };
    Reference {
        prompt: ids("prompt"),
        decode: ids("decode"),
        logits: serde_json::from_value(v["logits"].clone()).unwrap(),
    }
}

fn load(dir: &Path) -> LoadedModel {
    LoadedModel::load(dir, &Device::Cpu, DType::F32)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

/// A copy of a fixture in a temporary folder, its config.json edited by `edit`.
fn edited_copy(name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(family_dir(name)).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, dir.path().join(p.file_name().unwrap())).unwrap();
    }
    let cfg_path = dir.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    dir
}

fn step<'a>(kv: &'a mut t2_model::SeqKv, tokens: &'a [u32], want: WantLogits) -> SeqStep<'a> {
    SeqStep {
        kv,
        tokens,
        mix: 0,
        want,
    }
}

fn rows(t: &candle_core::Tensor) -> Vec<Vec<f32>> {
    match t.rank() {
        1 => vec![t.to_vec1().unwrap()],
        _ => t.to_vec2().unwrap(),
    }
}

/// The largest relative difference between t2's logits and the reference's, over three ways of running the
/// same tokens: prefill then decode one token at a time; a chunked prefill then a two-token step over the
/// cache; and a ragged batch where one sequence decodes while another prefills.
fn worst_diff(m: &LoadedModel, r: &Reference) -> f32 {
    let model = &m.model;
    let total = r.prompt.len() + r.decode.len();
    let mut worst = 0f32;
    let mut check = |got: &candle_core::Tensor, want: &[Vec<f32>]| {
        let got = rows(got);
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            worst = worst.max(common::rel_diff(g, w));
        }
    };
    let run = |steps: &mut [SeqStep<'_>], pool: &t2_model::KvPool| {
        model.forward(steps, &DenseProjector, pool).unwrap()
    };

    // 1. Prefill, then one token at a time.
    let (pool, mut kv) = model.pool_for(&[total]).unwrap();
    let out = run(&mut [step(&mut kv[0], &r.prompt, WantLogits::Last)], &pool);
    check(out[0].as_ref().unwrap(), &r.logits[..1]);
    for (i, t) in r.decode.iter().enumerate() {
        let out = run(
            &mut [step(&mut kv[0], std::slice::from_ref(t), WantLogits::Last)],
            &pool,
        );
        check(out[0].as_ref().unwrap(), &r.logits[i + 1..i + 2]);
    }

    // 2. The prompt in two chunks, then two decode tokens in one step (every position's logits), then the rest.
    let (pool, mut kv) = model.pool_for(&[total]).unwrap();
    let (a, b) = r.prompt.split_at(3);
    run(&mut [step(&mut kv[0], a, WantLogits::None)], &pool);
    let out = run(&mut [step(&mut kv[0], b, WantLogits::Last)], &pool);
    check(out[0].as_ref().unwrap(), &r.logits[..1]);
    let out = run(
        &mut [step(&mut kv[0], &r.decode[..2], WantLogits::All)],
        &pool,
    );
    check(out[0].as_ref().unwrap(), &r.logits[1..3]);
    for (i, t) in r.decode.iter().enumerate().skip(2) {
        let out = run(
            &mut [step(&mut kv[0], std::slice::from_ref(t), WantLogits::Last)],
            &pool,
        );
        check(out[0].as_ref().unwrap(), &r.logits[i + 1..i + 2]);
    }

    // 3. One sequence decodes its first token in the same step as another prefills the prompt.
    let (pool, mut kv) = model.pool_for(&[total, total]).unwrap();
    let (first, second) = kv.split_at_mut(1);
    run(
        &mut [step(&mut first[0], &r.prompt, WantLogits::None)],
        &pool,
    );
    let out = run(
        &mut [
            step(&mut first[0], &r.decode[..1], WantLogits::Last),
            step(&mut second[0], &r.prompt, WantLogits::Last),
        ],
        &pool,
    );
    check(out[0].as_ref().unwrap(), &r.logits[1..2]);
    check(out[1].as_ref().unwrap(), &r.logits[..1]);
    worst
}

#[test]
fn families_match_candle_transformers() {
    for name in FAMILIES {
        let m = load(&family_dir(name));
        let cfg = &m.model.cfg;
        match name {
            "llama3" => {
                assert!(matches!(cfg.rope_scaling, RopeScaling::Llama3 { .. }));
                assert!(!cfg.tie_word_embeddings);
            }
            "qwen2" => {
                assert!(cfg.qkv_bias && cfg.tie_word_embeddings);
                assert_eq!(cfg.rope_theta, 1e6);
            }
            "qwen3" => {
                assert!(cfg.qk_norm && !cfg.qkv_bias && cfg.tie_word_embeddings);
                assert_eq!(
                    cfg.head_dim, 32,
                    "head_dim from config.json, not hidden / heads"
                );
            }
            "mistral" => {
                // max_position_embeddings 128, sliding_window 32: the context is capped at the window.
                assert_eq!(cfg.max_position_embeddings, 32);
                assert!(!cfg.tie_word_embeddings);
            }
            _ => unreachable!(),
        }
        let d = worst_diff(&m, &reference(name));
        eprintln!("{name}: largest relative logit difference {d:.2e}");
        assert!(
            d <= TOLERANCE,
            "{name}: t2 vs candle-transformers logits differ by {d}"
        );
    }
}

/// The comparison can fail: the same llama3 checkpoint read as plain RoPE drifts well past the tolerance,
/// and so does Qwen3 without its q/k norms (read as Qwen2-like Llama).
#[test]
fn family_check_catches_missing_rope_scaling_and_qk_norm() {
    let plain = edited_copy("llama3", |c| {
        c.as_object_mut().unwrap().remove("rope_scaling");
    });
    let d = worst_diff(&load(plain.path()), &reference("llama3"));
    eprintln!("llama3 read as plain RoPE: {d:.2e}");
    assert!(d > 100.0 * TOLERANCE, "without rope scaling: {d}");
    let no_norm = edited_copy("qwen3", |c| c["model_type"] = "llama".into());
    let d = worst_diff(&load(no_norm.path()), &reference("qwen3"));
    eprintln!("qwen3 without q/k norms: {d:.2e}");
    assert!(d > 100.0 * TOLERANCE, "without q/k norms: {d}");
}

#[test]
fn checkpoint_layout_errors_are_clear() {
    let err = |dir: &Path| match LoadedModel::load(dir, &Device::Cpu, DType::F32) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    };
    // Sharded: only the files the index names are read (a stray safetensors file is ignored), and a missing
    // shard is named.
    let sharded = edited_copy("mistral", |_| {});
    std::fs::write(sharded.path().join("consolidated.safetensors"), b"not read").unwrap();
    let d = worst_diff(&load(sharded.path()), &reference("mistral"));
    assert!(d <= TOLERANCE, "{d}");
    std::fs::remove_file(sharded.path().join("model-00002-of-00002.safetensors")).unwrap();
    let e = err(sharded.path());
    assert!(
        e.contains("model-00002-of-00002.safetensors") && e.contains("missing"),
        "{e}"
    );

    // Unsupported rope scaling is refused, not run as plain RoPE.
    let yarn = edited_copy("llama3", |c| c["rope_scaling"]["rope_type"] = "yarn".into());
    let e = err(yarn.path());
    assert!(e.contains("yarn") && e.contains("not supported"), "{e}");

    // Heads: a config that says untied needs lm_head.weight; one silent about it ties when there is none.
    let untied = edited_copy("qwen2", |c| c["tie_word_embeddings"] = false.into());
    let e = err(untied.path());
    assert!(e.contains("lm_head.weight"), "{e}");
    let silent = edited_copy("qwen2", |c| {
        c.as_object_mut().unwrap().remove("tie_word_embeddings");
    });
    let m = load(silent.path());
    assert!(m.model.cfg.tie_word_embeddings);
    assert!(worst_diff(&m, &reference("qwen2")) <= TOLERANCE);
}

/// The engine loads the cache precision it is asked for, or writes it: a bf16 request is written once as a
/// bf16 file and then loaded from it; an f32 request does not settle for bf16 factors; once an f32 cache
/// exists, a bf16 request still takes its own bf16 file first.
#[test]
fn engine_loads_or_writes_the_cache_precision_it_is_asked_for() {
    let model = edited_copy("llama3", |_| {});
    let experts = tempfile::tempdir().unwrap();
    let origin = |cache_dtype| {
        let cfg = EngineConfig {
            targets: TargetSet::Mlp,
            cache_dtype,
            experts_dir: experts.path().into(),
            ..EngineConfig::new(model.path().into())
        };
        Engine::open(&cfg).unwrap().decomposition_origin.unwrap()
    };
    let path = |dtype| Decomposition::cache_path_for(model.path(), TargetSet::Mlp, dtype);
    let (bf16, f32) = (path(CacheDtype::Bf16), path(CacheDtype::F32));
    let computed = |p: &Path| Origin::Computed {
        saved_to: p.to_path_buf(),
        rejected: None,
    };
    assert_eq!(origin(CacheDtype::Bf16), computed(&bf16));
    assert!(!f32.exists());
    let bytes = std::fs::read(&bf16).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (name, u) = st
        .tensors()
        .into_iter()
        .find(|(n, _)| n.ends_with(".u"))
        .unwrap();
    assert_eq!(u.dtype(), safetensors::Dtype::BF16, "{name}");
    assert_eq!(origin(CacheDtype::Bf16), Origin::Loaded(bf16.clone()));
    assert_eq!(origin(CacheDtype::F32), computed(&f32));
    assert_eq!(origin(CacheDtype::Bf16), Origin::Loaded(bf16.clone()));
    std::fs::remove_file(&bf16).unwrap();
    assert_eq!(origin(CacheDtype::Bf16), Origin::Loaded(f32));
}
