//! y = x·Wᵀ over weights packed once, at load, for a register-blocked kernel: every row count on CPU
//! (prefill, batched decode, batch-1 decode) takes this path.
//!
//! W (n, k) is stored as panels of [`NR`] = 16 of its rows, each panel k-major (for every k, the 16 weights
//! of that column side by side, one 64-byte line), zero-padded to a whole panel. A micro-kernel keeps an
//! MR × 16·P tile of y in registers: per k it loads P weight lines, broadcasts one x value per row and does
//! MR·P vector FMAs. Loops around it block rows by [`MC`] (the x block stays in L2 while every panel
//! passes; a panel pair stays in L2 while the row tiles pass over it) and, for very long rows, k by
//! [`KC`]; threads split the panels. A decode step reads each weight line once.
//!
//! Why a row's result cannot depend on its batch: every output element is one FMA chain over k = 0, 1, …,
//! k-1, starting from 0, whatever the tile shape, the block sizes, the thread split or the instruction
//! set. Tiles and blocks only decide which chains run side by side and when a partial sum is parked in
//! memory, and parking an f32 is exact. (So AVX-512, AVX2 and the scalar fallback give the same bits too.)

use std::sync::OnceLock;

use rayon::prelude::*;

/// Rows of W per packed panel (the width of one AVX-512 vector, two AVX2 vectors).
pub const NR: usize = 16;
/// k per block. A tile keeps its sums in registers for a whole block and parks them in y between blocks.
/// Measured on SmolLM2's shapes (k ≤ 1536), blocking k at 256 or 128 (a weight block that fits L1) was no
/// faster than not blocking, and slower for the 49152-wide output head, whose y tiles are far apart in
/// memory; so blocking starts only where a 2-panel weight block (KC·128 bytes, 512 KiB) would outgrow L2.
/// Fixed, like everything else that shapes the loops: it does not change any sum's order anyway (see the
/// module note).
const KC: usize = 4096;
/// Rows of x per block: MC rows of x stay in L2 while every panel of a thread passes over them.
const MC: usize = 72;

/// One k-column of a panel: 16 weights, 64-byte aligned so every vector load is one cache line.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Line([f32; NR]);

/// Which kernel the CPU runs, chosen once at run time from what it reports (never at build time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Avx512,
    Avx2,
    Scalar,
}

impl Isa {
    /// The fastest kernel this CPU can run.
    pub fn detect() -> Isa {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            let all = Isa::available();
            all[0]
        })
    }

    /// Every kernel this CPU can run, fastest first (tests compare them).
    pub fn available() -> Vec<Isa> {
        let mut v = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") {
                v.push(Isa::Avx512);
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                v.push(Isa::Avx2);
            }
        }
        v.push(Isa::Scalar);
        v
    }

    /// (rows per tile, panels per tile): as many accumulators as the registers hold with room for the
    /// weight vectors and a broadcast (AVX-512: 12×2 of 32 zmm; AVX2: 6×2 of 16 ymm).
    fn tile(self) -> (usize, usize) {
        match self {
            Isa::Avx512 => (12, 2),
            Isa::Avx2 => (6, 1),
            Isa::Scalar => (4, 1),
        }
    }
}

/// An f32 weight matrix W (n, k) in the kernel's layout.
pub struct PackedWeight {
    n: usize,
    k: usize,
    /// Panel p is lines [p·k, (p+1)·k).
    lines: Vec<Line>,
}

impl std::fmt::Debug for PackedWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedWeight({}x{})", self.n, self.k)
    }
}

impl PackedWeight {
    /// Packs a row-major W (n, k). None for an empty matrix (nothing to gain).
    pub fn pack(w: &[f32], n: usize, k: usize) -> Option<Self> {
        if n == 0 || k == 0 || w.len() < n * k {
            return None;
        }
        let mut lines = vec![Line([0.0; NR]); n.div_ceil(NR) * k];
        lines.par_chunks_mut(k).enumerate().for_each(|(p, panel)| {
            for j in 0..NR.min(n - p * NR) {
                let row = &w[(p * NR + j) * k..(p * NR + j + 1) * k];
                for (line, &v) in panel.iter_mut().zip(row) {
                    line.0[j] = v;
                }
            }
        });
        Some(Self { n, k, lines })
    }

    /// (n, k) of W.
    pub fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// Bytes of the packed copy (what one pass over the weights reads).
    pub fn bytes(&self) -> usize {
        self.lines.len() * std::mem::size_of::<Line>()
    }

    /// out (m, n) = x (m, k) · Wᵀ, both row-major.
    pub fn matmul(&self, x: &[f32], m: usize, out: &mut [f32]) {
        self.matmul_with(Isa::detect(), x, m, out)
    }

    /// [`Self::matmul`] with a given kernel (it must be one of [`Isa::available`]).
    pub fn matmul_with(&self, isa: Isa, x: &[f32], m: usize, out: &mut [f32]) {
        let (n, k) = (self.n, self.k);
        assert!(
            x.len() >= m * k && out.len() >= m * n,
            "matmul: short buffers"
        );
        assert!(
            isa == Isa::detect() || Isa::available().contains(&isa),
            "matmul: {isa:?} not available"
        );
        if m == 0 {
            return;
        }
        let (mr, pw) = isa.tile();
        let panels = n.div_ceil(NR);
        // ~4 bands per thread balances uneven cores without paying much per-task overhead; a band is a
        // whole number of tiles wide.
        let threads = rayon::current_num_threads().max(1);
        let band = panels.div_ceil(threads * 4).max(pw).next_multiple_of(pw);
        let out = SyncPtr(out.as_mut_ptr());
        (0..panels.div_ceil(band)).into_par_iter().for_each(|b| {
            let (p0, p1) = (b * band, ((b + 1) * band).min(panels));
            // A tile that overhangs W's last row goes through here and only its real columns are kept.
            let mut spill = [0f32; 12 * 2 * NR];
            for k0 in (0..k).step_by(KC) {
                let kc = KC.min(k - k0);
                for i0 in (0..m).step_by(MC) {
                    let i1 = (i0 + MC).min(m);
                    let mut p = p0;
                    while p < p1 {
                        let pp = pw.min(p1 - p);
                        let mut i = i0;
                        while i < i1 {
                            let rows = mr.min(i1 - i);
                            // SAFETY: bands own disjoint columns of `out`; the tile's rows and columns are
                            // in bounds (checked against m and n above and in `run_tile`).
                            unsafe {
                                self.run_tile(isa, x, out, [i, rows], [p, pp], [k0, kc], &mut spill)
                            };
                            i += rows;
                        }
                        p += pp;
                    }
                }
            }
        });
    }

    /// One tile: rows [i, i+rows) of y, panels [p, p+pp), k block [k0, k0+kc).
    #[allow(clippy::too_many_arguments)]
    unsafe fn run_tile(
        &self,
        isa: Isa,
        x: &[f32],
        out: SyncPtr,
        [i, rows]: [usize; 2],
        [p, pp]: [usize; 2],
        [k0, kc]: [usize; 2],
        spill: &mut [f32; 12 * 2 * NR],
    ) {
        let (n, k) = (self.n, self.k);
        let width = pp * NR;
        let cols = width.min(n - p * NR);
        let direct = cols == width;
        let first = k0 == 0;
        let (c, ldc) = if direct {
            (out.0.add(i * n + p * NR), n)
        } else {
            if !first {
                for r in 0..rows {
                    let src = std::slice::from_raw_parts(out.0.add((i + r) * n + p * NR), cols);
                    spill[r * width..r * width + cols].copy_from_slice(src);
                }
            }
            (spill.as_mut_ptr(), width)
        };
        let t = Tile {
            x: x.as_ptr().add(i * k + k0),
            ldx: k,
            w: self.lines.as_ptr().add(p * k + k0) as *const f32,
            panel: k * NR,
            kc,
            c,
            ldc,
            first,
        };
        dispatch(isa, rows, pp, t);
        if !direct {
            for r in 0..rows {
                let dst = std::slice::from_raw_parts_mut(out.0.add((i + r) * n + p * NR), cols);
                dst.copy_from_slice(&spill[r * width..r * width + cols]);
            }
        }
    }
}

#[derive(Clone, Copy)]
struct SyncPtr(*mut f32);
// SAFETY: the bands that share it write disjoint columns.
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}

/// What a micro-kernel works on: x rows at `x + r·ldx` (already at the block's first k), weight panel q at
/// `w + q·panel` (already at the block's first k line), the y tile at `c + r·ldc`; `first`: the tile starts
/// from 0 rather than from what `c` holds.
#[derive(Clone, Copy)]
struct Tile {
    x: *const f32,
    ldx: usize,
    w: *const f32,
    panel: usize,
    kc: usize,
    c: *mut f32,
    ldc: usize,
    first: bool,
}

unsafe fn dispatch(isa: Isa, rows: usize, pp: usize, t: Tile) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => {
            macro_rules! rows512 {
                ($($r:literal)*) => {
                    match (rows, pp) {
                        $(($r, 1) => x86::k512::<$r, 1>(t),
                          ($r, _) => x86::k512::<$r, 2>(t),)*
                        _ => unreachable!("tile rows"),
                    }
                };
            }
            rows512!(1 2 3 4 5 6 7 8 9 10 11 12)
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => {
            macro_rules! rows256 {
                ($($r:literal)*) => {
                    match rows {
                        $($r => x86::k256::<$r>(t),)*
                        _ => unreachable!("tile rows"),
                    }
                };
            }
            rows256!(1 2 3 4 5 6)
        }
        _ => scalar(rows, pp, t),
    }
}

/// The same chains one at a time (`mul_add` is a fused multiply-add, as in the vector kernels).
unsafe fn scalar(rows: usize, pp: usize, t: Tile) {
    for r in 0..rows {
        for j in 0..pp * NR {
            let (q, l) = (j / NR, j % NR);
            let c = t.c.add(r * t.ldc + j);
            let mut acc = if t.first { 0.0 } else { *c };
            for kk in 0..t.kc {
                let w = *t.w.add(q * t.panel + kk * NR + l);
                acc = (*t.x.add(r * t.ldx + kk)).mul_add(w, acc);
            }
            *c = acc;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Tile, NR};
    use std::arch::x86_64::*;

    /// MR rows × P panels of 16, one zmm accumulator each.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::needless_range_loop)]
    pub unsafe fn k512<const MR: usize, const P: usize>(t: Tile) {
        let mut acc = [[_mm512_setzero_ps(); P]; MR];
        if !t.first {
            for r in 0..MR {
                for q in 0..P {
                    acc[r][q] = _mm512_loadu_ps(t.c.add(r * t.ldc + q * NR));
                }
            }
        }
        for kk in 0..t.kc {
            let mut w = [_mm512_setzero_ps(); P];
            for q in 0..P {
                w[q] = _mm512_load_ps(t.w.add(q * t.panel + kk * NR));
            }
            for r in 0..MR {
                let xb = _mm512_set1_ps(*t.x.add(r * t.ldx + kk));
                for q in 0..P {
                    acc[r][q] = _mm512_fmadd_ps(xb, w[q], acc[r][q]);
                }
            }
        }
        for r in 0..MR {
            for q in 0..P {
                _mm512_storeu_ps(t.c.add(r * t.ldc + q * NR), acc[r][q]);
            }
        }
    }

    /// MR rows × one panel of 16 (two ymm accumulators per row).
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::needless_range_loop)]
    pub unsafe fn k256<const MR: usize>(t: Tile) {
        let mut acc = [[_mm256_setzero_ps(); 2]; MR];
        if !t.first {
            for r in 0..MR {
                for h in 0..2 {
                    acc[r][h] = _mm256_loadu_ps(t.c.add(r * t.ldc + h * 8));
                }
            }
        }
        for kk in 0..t.kc {
            let w0 = _mm256_load_ps(t.w.add(kk * NR));
            let w1 = _mm256_load_ps(t.w.add(kk * NR + 8));
            for r in 0..MR {
                let xb = _mm256_broadcast_ss(&*t.x.add(r * t.ldx + kk));
                acc[r][0] = _mm256_fmadd_ps(xb, w0, acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(xb, w1, acc[r][1]);
            }
        }
        for r in 0..MR {
            for h in 0..2 {
                _mm256_storeu_ps(t.c.add(r * t.ldc + h * 8), acc[r][h]);
            }
        }
    }

    /// Independent FMA chains in registers, enough to cover the FMA latency on every port.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn peak512(iters: usize) -> f32 {
        let mut a = [_mm512_set1_ps(1.0); 24];
        let (m, b) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
        for _ in 0..iters {
            for v in a.iter_mut() {
                *v = _mm512_fmadd_ps(*v, m, b);
            }
        }
        let mut s = _mm512_setzero_ps();
        for v in a {
            s = _mm512_add_ps(s, v);
        }
        _mm512_reduce_add_ps(s)
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn peak256(iters: usize) -> f32 {
        let mut a = [_mm256_set1_ps(1.0); 12];
        let (m, b) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
        for _ in 0..iters {
            for v in a.iter_mut() {
                *v = _mm256_fmadd_ps(*v, m, b);
            }
        }
        let mut out = [0f32; 8];
        let mut s = _mm256_setzero_ps();
        for v in a {
            s = _mm256_add_ps(s, v);
        }
        _mm256_storeu_ps(out.as_mut_ptr(), s);
        out.iter().sum()
    }
}

/// This machine's f32 FMA peak in GFLOP/s on every rayon thread at once, with the widest vectors the
/// kernels use (a register-only loop of independent chains: no memory, the ceiling a GEMM can approach).
pub fn fma_peak_gflops(isa: Isa) -> f64 {
    let (lanes, chains) = match isa {
        Isa::Avx512 => (16, 24),
        Isa::Avx2 => (8, 12),
        Isa::Scalar => return 0.0,
    };
    let iters = 20_000_000;
    let threads = rayon::current_num_threads().max(1);
    let run = || {
        let t0 = std::time::Instant::now();
        (0..threads).into_par_iter().for_each(|_| {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `isa` is one this CPU reports.
            std::hint::black_box(unsafe {
                match isa {
                    Isa::Avx512 => x86::peak512(iters),
                    _ => x86::peak256(iters),
                }
            });
        });
        t0.elapsed().as_secs_f64()
    };
    run();
    let s = (0..3).map(|_| run()).fold(f64::INFINITY, f64::min);
    (threads * iters * chains * lanes * 2) as f64 / s / 1e9
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761).max(1);
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    fn reference(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f64> {
        let mut y = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                y[i * n + j] = (0..k)
                    .map(|l| x[i * k + l] as f64 * w[j * k + l] as f64)
                    .sum();
            }
        }
        y
    }

    #[test]
    fn every_kernel_matches_a_reference_product() {
        // Shapes that leave partial tiles and panels (n % 16, m % 12 nonzero), more rows than MC, and a
        // k past KC (sums parked in y between blocks).
        for (m, n, k) in [
            (1, 37, 300),
            (13, 70, 520),
            (30, 16, 17),
            (75, 33, 256),
            (5, 20, KC + 37),
        ] {
            let (x, w) = (data(m * k, 1), data(n * k, 2));
            let want = reference(&x, &w, m, n, k);
            let pw = PackedWeight::pack(&w, n, k).unwrap();
            for isa in Isa::available() {
                let mut got = vec![f32::NAN; m * n];
                pw.matmul_with(isa, &x, m, &mut got);
                for (e, (g, r)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (*g as f64 - r).abs() < 1e-4 * (k as f64).sqrt(),
                        "{isa:?} {m}x{n}x{k} element {e}: {g} vs {r}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_rows_result_is_the_same_bits_in_any_batch_and_kernel() {
        let (n, k) = (45, KC + 100);
        let w = data(n * k, 3);
        let pw = PackedWeight::pack(&w, n, k).unwrap();
        let m = 40; // > 3 row tiles of 12, and not a multiple of 12 or 6
        let x = data(m * k, 4);
        let isas = Isa::available();
        let mut batch = vec![0f32; m * n];
        pw.matmul_with(isas[0], &x, m, &mut batch);
        for isa in &isas {
            for i in 0..m {
                let mut alone = vec![0f32; n];
                pw.matmul_with(*isa, &x[i * k..(i + 1) * k], 1, &mut alone);
                assert_eq!(
                    alone.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    batch[i * n..(i + 1) * n]
                        .iter()
                        .map(|v| v.to_bits())
                        .collect::<Vec<_>>(),
                    "{isa:?} row {i}"
                );
            }
            // A row in the middle of a batch of another size (a different tile position).
            let mut mid = vec![0f32; 7 * n];
            pw.matmul_with(*isa, &x[20 * k..27 * k], 7, &mut mid);
            assert_eq!(mid, batch[20 * n..27 * n], "{isa:?} rows 20..27");
        }
    }
}
