//! GFLOP/s of the packed GEMM and the streaming kernel at SmolLM2-135M's shapes, for a few row counts,
//! beside this machine's measured FMA peak.
use candle_core::{Device, Tensor};
use std::time::Instant;
use t2_model::gemm::{fma_peak_gflops, Isa};

fn time(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let t0 = Instant::now();
        for _ in 0..reps {
            f();
        }
        best = best.min(t0.elapsed().as_secs_f64() / reps as f64);
    }
    best
}

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let isa = Isa::detect();
    let peak = fma_peak_gflops(isa);
    println!(
        "{isa:?}, {} threads: FMA peak {peak:.1} GFLOP/s",
        rayon::current_num_threads()
    );
    let ms: Vec<usize> = std::env::args()
        .nth(1)
        .map(|s| s.split(',').map(|v| v.parse().unwrap()).collect())
        .unwrap_or(vec![1, 16, 64, 256]);
    for (n, k) in [(1536usize, 576usize), (576, 1536), (576, 576), (49152, 576)] {
        let w = Tensor::randn(0f32, 1f32, (n, k), &dev)?;
        let p = t2_model::kernels::pack(&w).expect("packs");
        for &m in &ms {
            let x = Tensor::randn(0f32, 1f32, (m, k), &dev)?;
            let reps = (2e9 / (2.0 * (m * n * k) as f64)).clamp(3.0, 200.0) as usize;
            let flop = 2.0 * (m * n * k) as f64;
            let s_new = time(reps, || {
                std::hint::black_box(
                    t2_model::kernels::linear_packed(&x, Some(&w), Some(&p)).unwrap(),
                );
            });
            let xv: Vec<f32> = x.flatten_all()?.to_vec1()?;
            let mut buf = vec![0f32; m * n];
            let s_raw = time(reps, || p.matmul(&xv, m, &mut buf));
            let s_old = time(reps, || {
                std::hint::black_box(t2_model::kernels::linear(&x, &w).unwrap());
            });
            println!(
                "W {n:5}x{k:4} m={m:3}: packed {:8.3} ms {:6.1} GFLOP/s ({:4.1}% of peak) {:5.1} GB/s of W (into a reused buffer {:6.1} GFLOP/s) | streaming {:8.3} ms {:6.1} GFLOP/s",
                s_new * 1e3,
                flop / s_new / 1e9,
                100.0 * flop / s_new / 1e9 / peak,
                (n * k * 4) as f64 / s_new / 1e9,
                flop / s_raw / 1e9,
                s_old * 1e3,
                flop / s_old / 1e9,
            );
        }
    }
    Ok(())
}
