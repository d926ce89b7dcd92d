//! The same weights loaded from an HF folder (config.json + safetensors + tokenizer.json, q/k in the
//! original "rotate half" layout) must give the same logits as the GGUF: this checks the HF loader, the
//! q/k row permutation and both RoPE layouts against each other.

mod common;

use candle_core::{DType, Device};
use t2_model::{
    export::export_hf, ChatMessage, DenseProjector, LoadedModel, ModelSource, RopeStyle, SeqStep,
    WantLogits,
};

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
