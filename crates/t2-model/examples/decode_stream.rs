//! Bandwidth of one decode step's worth of packed GEMVs (SmolLM2-135M's 211 matrices and its output head,
//! all distinct, so nothing stays in cache), against one long GEMV over the same bytes.
use std::time::Instant;
use t2_model::gemm::PackedWeight;

fn main() {
    let mut shapes = Vec::new();
    for _ in 0..30 {
        shapes.extend([
            (576, 576),
            (192, 576),
            (192, 576),
            (576, 576),
            (1536, 576),
            (1536, 576),
            (576, 1536),
        ]);
    }
    shapes.push((49152, 576));
    let ws: Vec<PackedWeight> = shapes
        .iter()
        .map(|&(n, k)| PackedWeight::pack(&vec![0.5f32; n * k], n, k).unwrap())
        .collect();
    let bytes: usize = ws.iter().map(|w| w.bytes()).sum();
    let x = vec![1f32; 1536];
    let mut out = vec![0f32; 49152];
    let mut best = f64::INFINITY;
    for _ in 0..20 {
        let t0 = Instant::now();
        for w in &ws {
            let (n, _) = w.dims();
            w.matmul(&x, 1, &mut out[..n]);
        }
        best = best.min(t0.elapsed().as_secs_f64());
    }
    println!(
        "{} matrices, {:.0} MB: best {:.2} ms per pass, {:.1} GB/s",
        ws.len(),
        bytes as f64 / 1e6,
        best * 1e3,
        bytes as f64 / best / 1e9
    );
    for gap_us in [5u64, 20, 50] {
        let mut best = f64::INFINITY;
        let mut busy = 0f64;
        for _ in 0..10 {
            let t0 = Instant::now();
            let mut gaps = 0f64;
            for w in &ws {
                let (n, _) = w.dims();
                w.matmul(&x, 1, &mut out[..n]);
                let g = Instant::now();
                while g.elapsed().as_micros() < gap_us as u128 {
                    std::hint::spin_loop();
                }
                gaps += g.elapsed().as_secs_f64();
            }
            let t = t0.elapsed().as_secs_f64() - gaps;
            if t < best {
                best = t;
                busy = gaps;
            }
        }
        println!("with {gap_us} us of single-thread work after each: GEMV time {:.2} ms ({:.1} GB/s), gaps {:.2} ms", best * 1e3, bytes as f64 / best / 1e9, busy * 1e3);
    }
    let big = PackedWeight::pack(&vec![0.5f32; 262_144 * 1024], 262_144, 1024).unwrap();
    let mut o = vec![0f32; 262_144];
    let xb = vec![1f32; 1024];
    let mut bestb = f64::INFINITY;
    for _ in 0..5 {
        let t0 = Instant::now();
        big.matmul(&xb, 1, &mut o);
        bestb = bestb.min(t0.elapsed().as_secs_f64());
    }
    println!(
        "one 1 GiB GEMV: {:.1} GB/s",
        big.bytes() as f64 / bestb / 1e9
    );
}
