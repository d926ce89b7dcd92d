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
const _: () = assert!(KC.is_multiple_of(QB), "a k block must hold whole Q8 blocks");
/// Rows of x per block: MC rows of x stay in L2 while every panel of a thread passes over them.
const MC: usize = 72;

/// 64 bytes of a panel, aligned so an f32 k-column (16 weights) is one cache line; f16/bf16 columns are
/// 32 bytes, two per line.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Line([u32; NR]);

/// How the weights are stored; the kernels widen halves to f32 as they load them (exact), so the sums are
/// the same f32 FMA chains in every format. `Q8` holds 8-bit integers with one f32 scale per [`QB`]
/// weights of a row (the Q8_0 scheme): a block's products are summed, then scaled once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Elem {
    F32,
    F16,
    BF16,
    Q8,
}

/// Weights of a row that share one scale in the `Q8` format.
pub const QB: usize = 32;
/// Bytes of one `Q8` block of a panel: QB k-columns of 16 int8 weights, then the 16 rows' f32 scales
/// (nine whole lines, so every block starts 64-byte aligned).
const Q8_BLOCK: usize = QB * NR + NR * 4;

impl Elem {
    /// Bytes of one panel of a W with k columns.
    fn panel_bytes(self, k: usize) -> usize {
        match self {
            Elem::F32 => k * NR * 4,
            Elem::F16 | Elem::BF16 => k * NR * 2,
            Elem::Q8 => k.div_ceil(QB) * Q8_BLOCK,
        }
    }

    /// Byte offset of column k0 within a panel (for Q8, k0 is a multiple of QB).
    fn column_offset(self, k0: usize) -> usize {
        match self {
            Elem::Q8 => k0 / QB * Q8_BLOCK,
            _ => self.panel_bytes(k0),
        }
    }
}

/// A weight element the packer can store.
pub trait PackElem: Copy + Default + Send + Sync {
    const ELEM: Elem;
}
impl PackElem for f32 {
    const ELEM: Elem = Elem::F32;
}
impl PackElem for half::f16 {
    const ELEM: Elem = Elem::F16;
}
impl PackElem for half::bf16 {
    const ELEM: Elem = Elem::BF16;
}

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
            if is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
            {
                v.push(Isa::Avx2);
            }
        }
        v.push(Isa::Scalar);
        v
    }

    /// (rows per tile, panels per tile): as many accumulators as the registers hold with room for the
    /// weight vectors and a broadcast (AVX-512: 12×2 of 32 zmm; AVX2: 6×2 of 16 ymm).
    /// Q8 keeps a block's partial sums beside the running ones, so its tiles have half the rows.
    /// One row (batch-1 decode) gets up to 4 panels: a single row has only its tile's P chains in flight
    /// per k, and at P = 2 their FMA latency, not memory, bounded the half and Q8 formats.
    fn tile(self, elem: Elem, m: usize) -> (usize, usize) {
        if m == 1 && self != Isa::Scalar {
            return (1, 4);
        }
        match (self, elem) {
            (Isa::Avx512, Elem::Q8) => (6, 2),
            (Isa::Avx512, _) => (12, 2),
            (Isa::Avx2, Elem::Q8) => (3, 1),
            (Isa::Avx2, _) => (6, 1),
            (Isa::Scalar, _) => (4, 1),
        }
    }
}

/// A weight matrix W (n, k) in the kernel's layout.
pub struct PackedWeight {
    n: usize,
    k: usize,
    elem: Elem,
    /// Panel p is the bytes [p·k·16·e, (p+1)·k·16·e) for e bytes per weight.
    lines: Vec<Line>,
}

impl std::fmt::Debug for PackedWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedWeight({}x{} {:?})", self.n, self.k, self.elem)
    }
}

impl PackedWeight {
    /// Packs a row-major W (n, k) of f32, f16 or bf16. None for an empty matrix (nothing to gain).
    pub fn pack<T: PackElem>(w: &[T], n: usize, k: usize) -> Option<Self> {
        if n == 0 || k == 0 || w.len() < n * k {
            return None;
        }
        let panel = k * NR;
        let mut lines = vec![Line([0; NR]); (n.div_ceil(NR) * T::ELEM.panel_bytes(k)).div_ceil(64)];
        // SAFETY: every bit pattern is a valid T (f32, f16, bf16), the lines are at least this long and
        // 64-byte aligned.
        let all = unsafe {
            std::slice::from_raw_parts_mut(lines.as_mut_ptr() as *mut T, n.div_ceil(NR) * panel)
        };
        all.par_chunks_mut(panel)
            .enumerate()
            .for_each(|(p, panel)| {
                for j in 0..NR.min(n - p * NR) {
                    let row = &w[(p * NR + j) * k..(p * NR + j + 1) * k];
                    for (col, &v) in panel.chunks_exact_mut(NR).zip(row) {
                        col[j] = v;
                    }
                }
            });
        Some(Self {
            n,
            k,
            elem: T::ELEM,
            lines,
        })
    }

    /// Packs a row-major W (n, k) of f32 as 8-bit integers, one scale per [`QB`] weights of a row
    /// (max |w| ↦ 127, rounded to nearest). None for an empty matrix.
    pub fn pack_q8(w: &[f32], n: usize, k: usize) -> Option<Self> {
        if n == 0 || k == 0 || w.len() < n * k {
            return None;
        }
        let panel = Elem::Q8.panel_bytes(k);
        let mut lines = vec![Line([0; NR]); n.div_ceil(NR) * panel / 64];
        // SAFETY: the lines are plain bytes, n.div_ceil(NR) · panel of them.
        let all = unsafe {
            std::slice::from_raw_parts_mut(lines.as_mut_ptr() as *mut u8, n.div_ceil(NR) * panel)
        };
        all.par_chunks_mut(panel)
            .enumerate()
            .for_each(|(p, panel)| {
                for (b, block) in panel.chunks_exact_mut(Q8_BLOCK).enumerate() {
                    let (ints, scales) = block.split_at_mut(QB * NR);
                    for j in 0..NR.min(n - p * NR) {
                        let row = &w[(p * NR + j) * k..(p * NR + j + 1) * k];
                        let part = &row[b * QB..((b + 1) * QB).min(k)];
                        let amax = part.iter().fold(0f32, |a, v| a.max(v.abs()));
                        let scale = amax / 127.0;
                        let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
                        for (kk, &v) in part.iter().enumerate() {
                            ints[kk * NR + j] = (v * inv).round().clamp(-127.0, 127.0) as i8 as u8;
                        }
                        scales[j * 4..j * 4 + 4].copy_from_slice(&scale.to_ne_bytes());
                    }
                }
            });
        Some(Self {
            n,
            k,
            elem: Elem::Q8,
            lines,
        })
    }

    /// The values the weight holds, row-major (n, k), widened to f32: what its products compute with
    /// (the packed f32, f16 or bf16 values exactly; a `Q8` weight's integers times their block scales).
    pub fn values(&self) -> Vec<f32> {
        let (n, k) = (self.n, self.k);
        let panel = self.elem.panel_bytes(k);
        // SAFETY: the lines are n.div_ceil(NR) panels of plain bytes, 64-byte aligned, as `pack` and
        // `pack_q8` wrote them.
        let all = unsafe {
            std::slice::from_raw_parts(self.lines.as_ptr() as *const u8, self.lines.len() * 64)
        };
        let at = |bytes: &[u8], i: usize, size: usize| -> [u8; 4] {
            let mut b = [0u8; 4];
            b[..size].copy_from_slice(&bytes[i * size..(i + 1) * size]);
            b
        };
        let mut w = vec![0f32; n * k];
        for j in 0..n {
            let (p, l) = (j / NR, j % NR);
            let bytes = &all[p * panel..(p + 1) * panel];
            for kk in 0..k {
                w[j * k + kk] = match self.elem {
                    Elem::F32 => f32::from_ne_bytes(at(bytes, kk * NR + l, 4)),
                    Elem::F16 => {
                        let [a, b, ..] = at(bytes, kk * NR + l, 2);
                        half::f16::from_ne_bytes([a, b]).to_f32()
                    }
                    Elem::BF16 => {
                        let [a, b, ..] = at(bytes, kk * NR + l, 2);
                        half::bf16::from_ne_bytes([a, b]).to_f32()
                    }
                    Elem::Q8 => {
                        let block = &bytes[kk / QB * Q8_BLOCK..][..Q8_BLOCK];
                        let s =
                            f32::from_ne_bytes(block[QB * NR + l * 4..][..4].try_into().unwrap());
                        block[kk % QB * NR + l] as i8 as f32 * s
                    }
                };
            }
        }
        w
    }

    /// How the weights are stored.
    pub fn elem(&self) -> Elem {
        self.elem
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
        let (mr, pw) = isa.tile(self.elem, m);
        let panels = n.div_ceil(NR);
        // ~4 bands per thread balances uneven cores without paying much per-task overhead. Within a band
        // the tiles split its panels evenly (a band of 5 at up to 4 a tile: 3 + 2, not 4 + 1).
        let pool = crate::pool::Pool::global();
        let band = panels.div_ceil(pool.threads() * 4);
        let band = if m == 1 {
            band.max(2)
        } else {
            band.max(pw).next_multiple_of(pw)
        };
        let out = SyncPtr(out.as_mut_ptr());
        pool.run(panels.div_ceil(band), &|b| {
            let (p0, p1) = (b * band, ((b + 1) * band).min(panels));
            // A tile that overhangs W's last row goes through here and only its real columns are kept.
            let mut spill = [0f32; 12 * 2 * NR];
            for k0 in (0..k).step_by(KC) {
                let kc = KC.min(k - k0);
                for i0 in (0..m).step_by(MC) {
                    let i1 = (i0 + MC).min(m);
                    let mut p = p0;
                    while p < p1 {
                        let pp = (p1 - p).div_ceil((p1 - p).div_ceil(pw));
                        let mut i = i0;
                        while i < i1 {
                            let rows = mr.min(i1 - i);
                            // SAFETY: bands own disjoint columns of `out`; the tile's rows and columns are
                            // in bounds (checked against m and n above and in `run_tile`).
                            // Where several row tiles pass over a panel pair, the first also pulls this
                            // band's next pair toward L2, so the weights stream in while the others
                            // compute: +5-10% at 16 and 64 rows over a step's distinct weights, measured
                            // interleaved in one process. (A single tile per pair, as in decode, is the
                            // stream itself, and measured slower with it.)
                            let prefetch = i == i0 && i1 - i0 > mr && p + pp < p1;
                            unsafe {
                                self.run_tile(
                                    isa,
                                    x,
                                    out,
                                    [i, rows],
                                    [p, pp],
                                    [k0, kc],
                                    prefetch,
                                    &mut spill,
                                )
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
        prefetch: bool,
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
        let panel = self.elem.panel_bytes(k);
        let t = Tile {
            x: x.as_ptr().add(i * k + k0),
            ldx: k,
            w: (self.lines.as_ptr() as *const u8).add(p * panel + self.elem.column_offset(k0)),
            panel,
            kc,
            c,
            ldc,
            first,
            prefetch,
        };
        match self.elem {
            Elem::F32 => dispatch::<F32>(isa, rows, pp, t),
            Elem::F16 => dispatch::<F16>(isa, rows, pp, t),
            Elem::BF16 => dispatch::<BF16>(isa, rows, pp, t),
            Elem::Q8 => dispatch_q8(isa, rows, pp, t),
        }
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
/// byte `w + q·panel` (already at the block's first k column), the y tile at `c + r·ldc`; `first`: the tile
/// starts from 0 rather than from what `c` holds; `prefetch`: the panels after the tile's are worth asking
/// for (a hint: nothing is read from them).
#[derive(Clone, Copy)]
struct Tile {
    x: *const f32,
    ldx: usize,
    w: *const u8,
    panel: usize,
    kc: usize,
    c: *mut f32,
    ldc: usize,
    first: bool,
    prefetch: bool,
}

/// The storage formats as kernel parameters ([`Elem`] as a const generic).
const F32: u8 = 0;
const F16: u8 = 1;
const BF16: u8 = 2;

/// Picks the AVX-512 kernel instantiation for a tile of `$rows` rows (one of the listed literals) and 1 or
/// 2 panels: `$kernel!(rows, panels)` names the call.
macro_rules! avx512_tile {
    ($kernel:ident; $rows:expr, $pp:expr; $($r:literal)*) => {
        match ($rows, $pp) {
            $(($r, 1) => $kernel!($r, 1), ($r, _) => $kernel!($r, 2),)*
            _ => unreachable!("tile rows"),
        }
    };
}

unsafe fn dispatch<const E: u8>(isa: Isa, rows: usize, pp: usize, t: Tile) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => {
            macro_rules! k {
                ($r:literal, $p:literal) => {
                    x86::k512::<$r, $p, E>(t)
                };
            }
            match (rows, pp) {
                (1, 3) => k!(1, 3),
                (1, 4) => k!(1, 4),
                _ => avx512_tile!(k; rows, pp; 1 2 3 4 5 6 7 8 9 10 11 12),
            }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => {
            macro_rules! rows256 {
                ($($r:literal)*) => {
                    match (rows, pp) {
                        (1, 2) => x86::k256::<1, 2, E>(t),
                        (1, 3) => x86::k256::<1, 3, E>(t),
                        (1, 4) => x86::k256::<1, 4, E>(t),
                        $(($r, _) => x86::k256::<$r, 1, E>(t),)*
                        _ => unreachable!("tile rows"),
                    }
                };
            }
            rows256!(1 2 3 4 5 6)
        }
        _ => scalar::<E>(rows, pp, t),
    }
}

unsafe fn dispatch_q8(isa: Isa, rows: usize, pp: usize, t: Tile) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => {
            macro_rules! k {
                ($r:literal, $p:literal) => {
                    x86::k512q8::<$r, $p>(t)
                };
            }
            match (rows, pp) {
                (1, 3) => k!(1, 3),
                (1, 4) => k!(1, 4),
                _ => avx512_tile!(k; rows, pp; 1 2 3 4 5 6),
            }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => match (rows, pp) {
            (1, 2) => x86::k256q8::<1, 2>(t),
            (1, 3) => x86::k256q8::<1, 3>(t),
            (1, 4) => x86::k256q8::<1, 4>(t),
            (1, _) => x86::k256q8::<1, 1>(t),
            (2, _) => x86::k256q8::<2, 1>(t),
            (3, _) => x86::k256q8::<3, 1>(t),
            _ => unreachable!("tile rows"),
        },
        _ => scalar_q8(rows, pp, t),
    }
}

/// The Q8 chains one at a time: per block, a chain of products from 0, then one fused scale-and-add.
unsafe fn scalar_q8(rows: usize, pp: usize, t: Tile) {
    for r in 0..rows {
        for j in 0..pp * NR {
            let (q, l) = (j / NR, j % NR);
            let c = t.c.add(r * t.ldc + j);
            let mut acc = if t.first { 0.0 } else { *c };
            for b in 0..t.kc.div_ceil(QB) {
                let block = t.w.add(q * t.panel + b * Q8_BLOCK);
                let mut part = 0f32;
                for kk in 0..QB.min(t.kc - b * QB) {
                    let w = *(block.add(kk * NR + l) as *const i8) as f32;
                    part = (*t.x.add(r * t.ldx + b * QB + kk)).mul_add(w, part);
                }
                let s = *(block.add(QB * NR) as *const f32).add(l);
                acc = part.mul_add(s, acc);
            }
            *c = acc;
        }
    }
}

/// The same chains one at a time (`mul_add` is a fused multiply-add, as in the vector kernels).
unsafe fn scalar<const E: u8>(rows: usize, pp: usize, t: Tile) {
    for r in 0..rows {
        for j in 0..pp * NR {
            let (q, l) = (j / NR, j % NR);
            let c = t.c.add(r * t.ldc + j);
            let mut acc = if t.first { 0.0 } else { *c };
            for kk in 0..t.kc {
                let at = t.w.add(q * t.panel);
                let w = match E {
                    F32 => *(at as *const f32).add(kk * NR + l),
                    F16 => (*(at as *const half::f16).add(kk * NR + l)).to_f32(),
                    _ => (*(at as *const half::bf16).add(kk * NR + l)).to_f32(),
                };
                acc = (*t.x.add(r * t.ldx + kk)).mul_add(w, acc);
            }
            *c = acc;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Tile, F16, F32, NR, Q8_BLOCK, QB};
    use std::arch::x86_64::*;

    /// 16 weights of format E at byte `p` (64-byte aligned for f32, 32 for halves), widened to f32.
    macro_rules! load16 {
        ($e:expr, $p:expr) => {
            match $e {
                F32 => _mm512_load_ps($p as *const f32),
                F16 => _mm512_cvtph_ps(_mm256_load_si256($p as *const __m256i)),
                _ => _mm512_castsi512_ps(_mm512_slli_epi32(
                    _mm512_cvtepu16_epi32(_mm256_load_si256($p as *const __m256i)),
                    16,
                )),
            }
        };
    }

    /// 8 weights of format E at byte `p` (32-byte aligned for f32, 16 for halves), widened to f32.
    macro_rules! load8 {
        ($e:expr, $p:expr) => {
            match $e {
                F32 => _mm256_load_ps($p as *const f32),
                F16 => _mm256_cvtph_ps(_mm_load_si128($p as *const __m128i)),
                _ => _mm256_castsi256_ps(_mm256_slli_epi32(
                    _mm256_cvtepu16_epi32(_mm_load_si128($p as *const __m128i)),
                    16,
                )),
            }
        };
    }

    /// MR rows × P panels of 16, one zmm accumulator each.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::needless_range_loop)]
    pub unsafe fn k512<const MR: usize, const P: usize, const E: u8>(t: Tile) {
        let eb = if E == F32 { 4 } else { 2 };
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
                w[q] = load16!(E, t.w.add(q * t.panel + kk * NR * eb));
            }
            // One 64-byte line of each next panel per f32 column (half a column's worth for halves).
            if t.prefetch && (E == F32 || kk % 2 == 0) {
                for q in 0..P {
                    let at = t.w.wrapping_add((P + q) * t.panel + kk * NR * eb);
                    _mm_prefetch::<_MM_HINT_T1>(at as *const i8);
                }
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

    /// MR rows × P panels of 16 (two ymm accumulators per row and panel).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::needless_range_loop)]
    pub unsafe fn k256<const MR: usize, const P: usize, const E: u8>(t: Tile) {
        let eb = if E == F32 { 4 } else { 2 };
        let mut acc = [[[_mm256_setzero_ps(); 2]; P]; MR];
        if !t.first {
            for r in 0..MR {
                for q in 0..P {
                    for h in 0..2 {
                        acc[r][q][h] = _mm256_loadu_ps(t.c.add(r * t.ldc + q * NR + h * 8));
                    }
                }
            }
        }
        for kk in 0..t.kc {
            for q in 0..P {
                let at = t.w.add(q * t.panel + kk * NR * eb);
                let w0 = load8!(E, at);
                let w1 = load8!(E, at.add(8 * eb));
                for r in 0..MR {
                    let xb = _mm256_broadcast_ss(&*t.x.add(r * t.ldx + kk));
                    acc[r][q][0] = _mm256_fmadd_ps(xb, w0, acc[r][q][0]);
                    acc[r][q][1] = _mm256_fmadd_ps(xb, w1, acc[r][q][1]);
                }
            }
        }
        for r in 0..MR {
            for q in 0..P {
                for h in 0..2 {
                    _mm256_storeu_ps(t.c.add(r * t.ldc + q * NR + h * 8), acc[r][q][h]);
                }
            }
        }
    }

    /// MR rows × P panels of 16 over Q8 blocks: a block's products go into their own accumulators from 0,
    /// which are then scaled into the running sums (the same chains as `scalar_q8`).
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::needless_range_loop)]
    pub unsafe fn k512q8<const MR: usize, const P: usize>(t: Tile) {
        let mut acc = [[_mm512_setzero_ps(); P]; MR];
        if !t.first {
            for r in 0..MR {
                for q in 0..P {
                    acc[r][q] = _mm512_loadu_ps(t.c.add(r * t.ldc + q * NR));
                }
            }
        }
        for b in 0..t.kc.div_ceil(QB) {
            let block = t.w.add(b * Q8_BLOCK);
            let mut part = [[_mm512_setzero_ps(); P]; MR];
            for kk in 0..QB.min(t.kc - b * QB) {
                let mut w = [_mm512_setzero_ps(); P];
                for q in 0..P {
                    let ints = _mm_load_si128(block.add(q * t.panel + kk * NR) as *const __m128i);
                    w[q] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(ints));
                }
                for r in 0..MR {
                    let xb = _mm512_set1_ps(*t.x.add(r * t.ldx + b * QB + kk));
                    for q in 0..P {
                        part[r][q] = _mm512_fmadd_ps(xb, w[q], part[r][q]);
                    }
                }
            }
            for q in 0..P {
                let s = _mm512_load_ps(block.add(q * t.panel + QB * NR) as *const f32);
                for r in 0..MR {
                    acc[r][q] = _mm512_fmadd_ps(part[r][q], s, acc[r][q]);
                }
            }
        }
        for r in 0..MR {
            for q in 0..P {
                _mm512_storeu_ps(t.c.add(r * t.ldc + q * NR), acc[r][q]);
            }
        }
    }

    /// MR rows × P panels of 16 over Q8 blocks (per row and panel, two ymm for the running sums and two for
    /// the block's).
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::needless_range_loop)]
    pub unsafe fn k256q8<const MR: usize, const P: usize>(t: Tile) {
        let mut acc = [[[_mm256_setzero_ps(); 2]; P]; MR];
        if !t.first {
            for r in 0..MR {
                for q in 0..P {
                    for h in 0..2 {
                        acc[r][q][h] = _mm256_loadu_ps(t.c.add(r * t.ldc + q * NR + h * 8));
                    }
                }
            }
        }
        for b in 0..t.kc.div_ceil(QB) {
            let block = t.w.add(b * Q8_BLOCK);
            let mut part = [[[_mm256_setzero_ps(); 2]; P]; MR];
            for kk in 0..QB.min(t.kc - b * QB) {
                for q in 0..P {
                    let at = block.add(q * t.panel + kk * NR);
                    let w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(
                        at as *const __m128i,
                    )));
                    let w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(
                        at.add(8) as *const __m128i
                    )));
                    for r in 0..MR {
                        let xb = _mm256_broadcast_ss(&*t.x.add(r * t.ldx + b * QB + kk));
                        part[r][q][0] = _mm256_fmadd_ps(xb, w0, part[r][q][0]);
                        part[r][q][1] = _mm256_fmadd_ps(xb, w1, part[r][q][1]);
                    }
                }
            }
            for q in 0..P {
                let s = block.add(q * t.panel + QB * NR) as *const f32;
                let (s0, s1) = (_mm256_load_ps(s), _mm256_load_ps(s.add(8)));
                for r in 0..MR {
                    acc[r][q][0] = _mm256_fmadd_ps(part[r][q][0], s0, acc[r][q][0]);
                    acc[r][q][1] = _mm256_fmadd_ps(part[r][q][1], s1, acc[r][q][1]);
                }
            }
        }
        for r in 0..MR {
            for q in 0..P {
                for h in 0..2 {
                    _mm256_storeu_ps(t.c.add(r * t.ldc + q * NR + h * 8), acc[r][q][h]);
                }
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

    /// W packed in each storage format, with the values it holds (rounded to that format).
    fn formats(w: &[f32], n: usize, k: usize) -> Vec<(Elem, PackedWeight, Vec<f32>)> {
        let f16: Vec<half::f16> = w.iter().map(|&v| half::f16::from_f32(v)).collect();
        let bf16: Vec<half::bf16> = w.iter().map(|&v| half::bf16::from_f32(v)).collect();
        vec![
            (Elem::F32, PackedWeight::pack(w, n, k).unwrap(), w.to_vec()),
            (
                Elem::F16,
                PackedWeight::pack(&f16, n, k).unwrap(),
                f16.iter().map(|v| v.to_f32()).collect(),
            ),
            (
                Elem::BF16,
                PackedWeight::pack(&bf16, n, k).unwrap(),
                bf16.iter().map(|v| v.to_f32()).collect(),
            ),
            {
                let q8 = PackedWeight::pack_q8(w, n, k).unwrap();
                let held = q8.values();
                (Elem::Q8, q8, held)
            },
        ]
    }

    #[test]
    fn values_read_back_exactly_what_was_packed() {
        // Ragged on both sides: a partial last panel and k not a multiple of the Q8 block.
        let (n, k) = (2 * NR + 3, 2 * QB + 7);
        let w = data(n * k, 4);
        for (elem, packed, held) in formats(&w, n, k) {
            if elem == Elem::Q8 {
                continue; // `held` is `values()` itself there; its bound is the next test
            }
            let back = packed.values();
            assert_eq!(back.len(), n * k);
            let same = back
                .iter()
                .zip(&held)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(
                same,
                "{elem:?}: unpacked values differ from the packed ones"
            );
        }
    }

    #[test]
    fn q8_holds_each_weight_within_half_a_step_of_its_block_scale() {
        let (n, k) = (21, 3 * QB + 5);
        let w = data(n * k, 9);
        let held = PackedWeight::pack_q8(&w, n, k).unwrap().values();
        for j in 0..n {
            for b in 0..k.div_ceil(QB) {
                let r = j * k + b * QB..j * k + ((b + 1) * QB).min(k);
                let step = w[r.clone()].iter().fold(0f32, |a, v| a.max(v.abs())) / 127.0;
                for i in r {
                    assert!(
                        (w[i] - held[i]).abs() <= step * 0.5001,
                        "row {j} col {}",
                        i - j * k
                    );
                }
            }
        }
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
            // One row over enough panels for 3- and 4-panel decode tiles.
            (1, 16 * 53 + 3, 70),
        ] {
            let (x, w) = (data(m * k, 1), data(n * k, 2));
            for (elem, pw, held) in formats(&w, n, k) {
                assert_eq!(pw.elem(), elem);
                let want = reference(&x, &held, m, n, k);
                for isa in Isa::available() {
                    let mut got = vec![f32::NAN; m * n];
                    pw.matmul_with(isa, &x, m, &mut got);
                    for (e, (g, r)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (*g as f64 - r).abs() < 1e-4 * (k as f64).sqrt(),
                            "{elem:?} {isa:?} {m}x{n}x{k} element {e}: {g} vs {r}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_rows_result_is_the_same_bits_in_any_batch_and_kernel() {
        // The second shape has enough panels for the wider one-row (decode) tiles.
        for (n, k) in [(45, KC + 100), (16 * 53 + 3, 300)] {
            let w = data(n * k, 3);
            let m = 40; // > 3 row tiles of 12, and not a multiple of 12 or 6
            let x = data(m * k, 4);
            let isas = Isa::available();
            for (elem, pw, _) in formats(&w, n, k) {
                let mut batch = vec![0f32; m * n];
                pw.matmul_with(isas[0], &x, m, &mut batch);
                for isa in &isas {
                    rows_match(&pw, *isa, &x, &batch, m, format!("{elem:?} {isa:?} n={n}"));
                }
            }
        }
    }

    /// Each row of `batch` (x's m rows through `pw`) is what that row gives alone and within another
    /// batch, bit for bit.
    fn rows_match(pw: &PackedWeight, isa: Isa, x: &[f32], batch: &[f32], m: usize, what: String) {
        let (n, k) = pw.dims();
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        for i in 0..m {
            let mut alone = vec![0f32; n];
            pw.matmul_with(isa, &x[i * k..(i + 1) * k], 1, &mut alone);
            assert_eq!(
                bits(&alone),
                bits(&batch[i * n..(i + 1) * n]),
                "{what} row {i}"
            );
        }
        // Rows in the middle of a batch of another size (other tile positions).
        let mut mid = vec![0f32; 7 * n];
        pw.matmul_with(isa, &x[20 * k..27 * k], 7, &mut mid);
        assert_eq!(
            bits(&mid),
            bits(&batch[20 * n..27 * n]),
            "{what} rows 20..27"
        );
    }
}
