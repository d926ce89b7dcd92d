//! Checkpoints round-trip exactly, and a damaged or truncated one is refused with a clear reason.

use std::collections::BTreeMap;

use t2_model::{ProjId, ProjKind};
use t2_train::checkpoint::{Checkpoint, TrainState};

fn vectors(seed: f32) -> BTreeMap<ProjId, Vec<f32>> {
    (0..3)
        .map(|l| {
            (
                ProjId {
                    layer: l,
                    kind: ProjKind::Up,
                },
                (0..64).map(|i| seed + i as f32 * 0.01).collect(),
            )
        })
        .collect()
}

fn checkpoint() -> Checkpoint {
    Checkpoint {
        state: TrainState {
            step: 7,
            adam_t: 7,
            best_val: Some(0.5),
            best_step: 5,
            config: serde_json::json!({"task": "arith", "seed": 1}),
        },
        p: vectors(0.1),
        m: vectors(0.2),
        v: vectors(0.3),
        best: vectors(0.4),
    }
}

#[test]
fn round_trip_and_damage() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("checkpoint.safetensors");
    checkpoint().save(&path).unwrap();
    let back = Checkpoint::load(&path).unwrap();
    assert_eq!(back.state, checkpoint().state);
    assert_eq!(back.p, checkpoint().p);
    assert_eq!(back.best, checkpoint().best);

    let bytes = std::fs::read(&path).unwrap();
    // One flipped bit in the last number: still a valid safetensors file, but the checksum catches it.
    let mut flipped = bytes.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 0x01;
    std::fs::write(&path, &flipped).unwrap();
    let err = Checkpoint::load(&path)
        .err()
        .expect("a damaged checkpoint is refused")
        .to_string();
    assert!(err.contains("checksum mismatch"), "{err}");

    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = Checkpoint::load(&path)
        .err()
        .expect("a truncated checkpoint is refused")
        .to_string();
    assert!(err.contains("unusable"), "{err}");
}
