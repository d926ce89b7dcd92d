//! GFLOP/s of the streaming x·Wᵀ kernel at SmolLM2's shapes, for a few batch sizes.
use candle_core::{Device, Tensor};
use std::time::Instant;

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    for (n, k) in [(1536usize, 576usize), (576, 1536), (49152, 576)] {
        let w = Tensor::randn(0f32, 1f32, (n, k), &dev)?;
        for m in [1usize, 4, 16, 64] {
            let x = Tensor::randn(0f32, 1f32, (m, k), &dev)?;
            let _ = t2_model::kernels::linear(&x, &w)?;
            let reps = 40;
            let t0 = Instant::now();
            for _ in 0..reps {
                let _ = t2_model::kernels::linear(&x, &w)?;
            }
            let s = t0.elapsed().as_secs_f64() / reps as f64;
            println!(
                "W {n}x{k} m={m:3}: {:7.3} ms  {:6.1} GFLOP/s  {:5.1} GB/s of W",
                s * 1e3,
                2.0 * (m * n * k) as f64 / s / 1e9,
                (n * k * 4) as f64 / s / 1e9
            );
        }
    }
    Ok(())
}
