//! y = x·Wᵀ on CPU, and the fused per-layer steps around it (residual add with norm, SwiGLU, the KV write).
//!
//! f32 weights packed at load go through the register-blocked GEMM of [`crate::gemm`] for every row count
//! ([`linear_packed`]). Weights without a packed copy (f16/bf16, merged or factored SVF matrices) take a
//! streaming kernel: each core streams its own band of W's rows once, dotting every row of x against it
//! while it sits in L1 (AVX2/FMA, with f16/bf16 widened on the fly; a 2x4 register block once there are
//! four or more rows). Both sum a row the same way whatever the batch; other devices and non-contiguous
//! weights go to candle's matmul.

use candle_core::{CpuStorage, DType, Storage, Tensor};
use rayon::prelude::*;

use crate::gemm::PackedWeight;

/// A packed copy of a weight (n, k) on CPU (f32, f16 or bf16, kept in its own format), or None where the
/// packed kernel does not apply.
pub fn pack(w: &Tensor) -> Option<PackedWeight> {
    with_cpu_weight(w, |v, at, n, k| match v {
        CpuStorage::F32(v) => PackedWeight::pack(&v[at], n, k),
        CpuStorage::F16(v) => PackedWeight::pack(&v[at], n, k),
        CpuStorage::BF16(v) => PackedWeight::pack(&v[at], n, k),
        _ => None,
    })
}

/// A copy of a weight (n, k) on CPU in 8-bit integers with block scales ([`PackedWeight::pack_q8`]), or
/// None where the packed kernel does not apply.
pub fn pack_q8(w: &Tensor) -> Option<PackedWeight> {
    if w.dtype() != DType::F32 || !w.is_contiguous() {
        return pack_q8(&w.to_dtype(DType::F32).ok()?.contiguous().ok()?);
    }
    with_cpu_weight(w, |v, at, n, k| match v {
        CpuStorage::F32(v) => PackedWeight::pack_q8(&v[at], n, k),
        _ => None,
    })
}

/// Calls `f` with the CPU storage of the contiguous 2-D weight `w`, the range of its own elements and its
/// dims: borrowed rather than copied, since packing reads a weight once.
fn with_cpu_weight(
    w: &Tensor,
    f: impl FnOnce(&CpuStorage, std::ops::Range<usize>, usize, usize) -> Option<PackedWeight>,
) -> Option<PackedWeight> {
    if !w.device().is_cpu() {
        return None;
    }
    let (n, k) = w.dims2().ok()?;
    let (st, l) = w.storage_and_layout();
    let (a, b) = l.contiguous_offsets()?;
    match &*st {
        Storage::Cpu(c) => f(c, a..b, n, k),
        _ => None,
    }
}

/// x (m, k) · W (n, k)ᵀ → (m, n), through `packed` (W's packed copy) where it applies.
pub fn linear_packed(
    x: &Tensor,
    w: Option<&Tensor>,
    packed: Option<&PackedWeight>,
) -> candle_core::Result<Tensor> {
    // Without the dense copy (released once packed) only the packed kernel can run.
    let fallback = |x: &Tensor| {
        match w {
        Some(w) => linear(x, w),
        None => Err(candle_core::Error::Msg(format!(
            "this weight is held only in the CPU's packed layout, which cannot multiply a {:?} {:?} input",
            x.device().location(),
            x.dims()
        ))),
    }
    };
    let Some(p) = packed else {
        return fallback(x);
    };
    let (m, k) = x.dims2()?;
    let (n, pk) = p.dims();
    if k != pk || !x.device().is_cpu() {
        return fallback(x);
    }
    // The kernel multiplies in f32 (half-precision weights are widened as they load); half activations
    // are widened here and y narrowed back, as the streaming kernel does.
    let xf = x.to_dtype(DType::F32)?.contiguous()?;
    let mut out = vec![0f32; m * n];
    {
        let (st, l) = xf.storage_and_layout();
        let (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) = (&*st, l.contiguous_offsets())
        else {
            drop(st);
            return fallback(x);
        };
        p.matmul(&v[a..b], m, &mut out);
    }
    Tensor::from_vec(out, (m, n), x.device())?.to_dtype(x.dtype())
}

/// x (m, k) · W (n, k)ᵀ → (m, n), in x's dtype.
pub fn linear(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    match stream_linear(x, w)? {
        Some(y) => Ok(y),
        None => x.matmul(&w.t()?),
    }
}

fn stream_linear(x: &Tensor, w: &Tensor) -> candle_core::Result<Option<Tensor>> {
    let (m, k) = x.dims2()?;
    let (n, k2) = w.dims2()?;
    // Every row count goes through the same kernels on CPU, so a row's result never depends on what else
    // is in the batch: a sequence gets bit-identical logits alone or batched with others. (Measured here,
    // this kernel also beats candle's GEMM from 8 rows up to a few hundred.)
    if m == 0 || k != k2 || !x.device().is_cpu() {
        return Ok(None);
    }
    // Copying a contiguous f32 x directly skips three tensor ops per projection (dtype, flatten, to_vec).
    let xs: Vec<f32> = if x.dtype() == DType::F32 && x.is_contiguous() {
        let (st, l) = x.storage_and_layout();
        match (&*st, l.contiguous_offsets()) {
            (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => v[a..b].to_vec(),
            _ => return Ok(None),
        }
    } else {
        x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?
    };
    let (storage, layout) = w.storage_and_layout();
    let (Storage::Cpu(cpu), Some((start, end))) = (&*storage, layout.contiguous_offsets()) else {
        return Ok(None);
    };
    // out is (n, m): each band of W's rows owns a contiguous band of out.
    let mut out = vec![0f32; n * m];
    match cpu {
        CpuStorage::F32(v) => run(&v[start..end], &xs, m, k, &mut out),
        CpuStorage::F16(v) => run(&v[start..end], &xs, m, k, &mut out),
        CpuStorage::BF16(v) => run(&v[start..end], &xs, m, k, &mut out),
        _ => return Ok(None),
    }
    drop(storage);
    let y = Tensor::from_vec(out, (n, m), x.device())?
        .t()?
        .contiguous()?;
    Ok(Some(y.to_dtype(x.dtype())?))
}

/// Each row of x (rows, cols) times its mix's scales: `table` (capacity, cols) at the row's id in `rows`.
/// One kernel on a GPU with the fused kernels on; elsewhere a gather and a multiply (the CPU's factored
/// path runs on packed kernels around this, where these are not the cost).
pub fn scale_rows(
    x: &Tensor,
    table: &Tensor,
    rows: &crate::llama::RowMixes,
) -> candle_core::Result<Tensor> {
    let capacity = table.dim(0)?;
    if let Some(&bad) = rows.ids.iter().find(|&&m| m as usize >= capacity) {
        candle_core::bail!("mix id {bad} is outside the mix table of {capacity}");
    }
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() && crate::cuda::fused() {
        return crate::cuda::scale_rows(x, table, &rows.ids_tensor);
    }
    x * table.index_select(&rows.ids_tensor, 0)?
}

/// Writes a step's new K (or V) rows into a layer's pool in place: `src` is (rows, kv_heads, head_dim),
/// contiguous, in the pool's dtype; each write is (first batch row, rows, first pool row of head 0), and
/// head h's run starts h·block_size rows further (the pool's head-major block layout). One op per layer
/// and tensor, instead of a candle op per head and run.
pub struct KvWrite<'a> {
    pub src: &'a Tensor,
    pub writes: &'a [(usize, usize, usize)],
    pub kv_heads: usize,
}

impl candle_core::InplaceOp1 for KvWrite<'_> {
    fn name(&self) -> &'static str {
        "kv-write"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        let (Some((d0, _)), Some(&d)) = (layout.contiguous_offsets(), layout.dims().last()) else {
            candle_core::bail!("kv-write: the pool must be contiguous");
        };
        let (ss, sl) = self.src.storage_and_layout();
        let Some((s0, _)) = sl.contiguous_offsets() else {
            candle_core::bail!("kv-write: the new rows must be contiguous");
        };
        let (h, bs) = (self.kv_heads, crate::kv::BLOCK_SIZE);
        match (dst, &*ss) {
            (CpuStorage::F32(dv), Storage::Cpu(CpuStorage::F32(sv))) => {
                copy_rows(&mut dv[d0..], &sv[s0..], self.writes, h, d, bs)
            }
            (CpuStorage::F16(dv), Storage::Cpu(CpuStorage::F16(sv))) => {
                copy_rows(&mut dv[d0..], &sv[s0..], self.writes, h, d, bs)
            }
            (CpuStorage::BF16(dv), Storage::Cpu(CpuStorage::BF16(sv))) => {
                copy_rows(&mut dv[d0..], &sv[s0..], self.writes, h, d, bs)
            }
            _ => candle_core::bail!("kv-write: the pool and the new rows must share a CPU dtype"),
        }
        Ok(())
    }
}

fn copy_rows<T: Copy>(
    dst: &mut [T],
    src: &[T],
    writes: &[(usize, usize, usize)],
    kv_heads: usize,
    d: usize,
    bs: usize,
) {
    for &(off, len, row) in writes {
        for h in 0..kv_heads {
            for i in 0..len {
                let s = ((off + i) * kv_heads + h) * d;
                let t = (row + h * bs + i) * d;
                dst[t..t + d].copy_from_slice(&src[s..s + d]);
            }
        }
    }
}

/// A weight element the kernels can widen to f32.
pub trait WeightElem: Copy + Send + Sync {
    fn to_f32(self) -> f32;
    /// dot(w, x) over equal-length slices.
    fn dot(w: &[Self], x: &[f32]) -> f32;
    /// out[r][b] = dot(w_r, x_b) for two weight rows and four inputs; false if not available for this type.
    fn dot_2x4(_w: [&[Self]; 2], _x: [&[f32]; 4], _out: &mut [[f32; 4]; 2]) -> bool {
        false
    }
}

fn run<T: WeightElem>(w: &[T], xs: &[f32], m: usize, k: usize, out: &mut [f32]) {
    let n = out.len() / m;
    // ~4 bands per thread balances uneven cores without paying much per-task overhead.
    let bands = (rayon::current_num_threads() * 4).max(1);
    let rows_per_band = n.div_ceil(bands).max(16);
    let x = |b: usize| &xs[b * k..(b + 1) * k];
    out.par_chunks_mut(rows_per_band * m)
        .enumerate()
        .for_each(|(band, o)| {
            let first = band * rows_per_band;
            let rows = o.len() / m;
            let wrow = |r: usize| &w[(first + r) * k..(first + r + 1) * k];
            let mut r = 0;
            // Two weight rows against four inputs at a time: eight independent FMA chains keep the FMA
            // units busy once a batch has several rows (one chain per dot is latency-bound). Both kernels
            // sum in the same order, so the result of a row does not depend on its neighbours.
            while r + 2 <= rows {
                let w2 = [wrow(r), wrow(r + 1)];
                let mut b = 0;
                while b + 4 <= m {
                    let mut acc = [[0f32; 4]; 2];
                    if !T::dot_2x4(w2, [x(b), x(b + 1), x(b + 2), x(b + 3)], &mut acc) {
                        break;
                    }
                    for j in 0..4 {
                        o[r * m + b + j] = acc[0][j];
                        o[(r + 1) * m + b + j] = acc[1][j];
                    }
                    b += 4;
                }
                for bb in b..m {
                    o[r * m + bb] = T::dot(w2[0], x(bb));
                    o[(r + 1) * m + bb] = T::dot(w2[1], x(bb));
                }
                r += 2;
            }
            if r < rows {
                for b in 0..m {
                    o[r * m + b] = T::dot(wrow(r), x(b));
                }
            }
        });
}

fn dot_scalar<T: WeightElem>(w: &[T], x: &[f32]) -> f32 {
    w.iter().zip(x).map(|(a, b)| a.to_f32() * b).sum()
}

#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    })
}

impl WeightElem for f32 {
    fn to_f32(self) -> f32 {
        self
    }
    fn dot(w: &[f32], x: &[f32]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: the CPU supports AVX2 and FMA (checked above).
            return unsafe { avx2::dot_f32(w, x) };
        }
        dot_scalar(w, x)
    }
    fn dot_2x4(w: [&[f32]; 2], x: [&[f32]; 4], out: &mut [[f32; 4]; 2]) -> bool {
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: the CPU supports AVX2 and FMA (checked above).
            unsafe { avx2::dot_2x4_f32(w, x, out) };
            return true;
        }
        let _ = (w, x, out);
        false
    }
}

impl WeightElem for half::f16 {
    fn to_f32(self) -> f32 {
        self.to_f32()
    }
    fn dot(w: &[half::f16], x: &[f32]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: the CPU supports AVX2, FMA and F16C (checked above).
            return unsafe { avx2::dot_f16(w, x) };
        }
        dot_scalar(w, x)
    }
}

impl WeightElem for half::bf16 {
    fn to_f32(self) -> f32 {
        self.to_f32()
    }
    fn dot(w: &[half::bf16], x: &[f32]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: the CPU supports AVX2 and FMA (checked above).
            return unsafe { avx2::dot_bf16(w, x) };
        }
        dot_scalar(w, x)
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// Four independent accumulators hide the FMA latency; loads are unaligned.
    macro_rules! dot_body {
        ($w:ident, $x:ident, $load:expr) => {{
            let n = $w.len().min($x.len());
            let (wp, xp) = ($w.as_ptr(), $x.as_ptr());
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut i = 0;
            while i + 32 <= n {
                for (j, a) in acc.iter_mut().enumerate() {
                    let o = i + 8 * j;
                    *a = _mm256_fmadd_ps($load(wp.add(o)), _mm256_loadu_ps(xp.add(o)), *a);
                }
                i += 32;
            }
            while i + 8 <= n {
                acc[0] = _mm256_fmadd_ps($load(wp.add(i)), _mm256_loadu_ps(xp.add(i)), acc[0]);
                i += 8;
            }
            let mut s = hsum(_mm256_add_ps(
                _mm256_add_ps(acc[0], acc[1]),
                _mm256_add_ps(acc[2], acc[3]),
            ));
            while i < n {
                s += super::WeightElem::to_f32(*wp.add(i)) * *xp.add(i);
                i += 1;
            }
            s
        }};
    }

    /// One accumulator, like [`dot_2x4_f32`], so both give bit-identical sums (a row's logits must not
    /// depend on the batch it is in). One FMA chain still outruns memory at one row.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_f32(w: &[f32], x: &[f32]) -> f32 {
        let n = w.len().min(x.len());
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        while i + 8 <= n {
            acc = _mm256_fmadd_ps(
                _mm256_loadu_ps(w.as_ptr().add(i)),
                _mm256_loadu_ps(x.as_ptr().add(i)),
                acc,
            );
            i += 8;
        }
        let mut s = hsum(acc);
        for j in i..n {
            s += w[j] * x[j];
        }
        s
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_2x4_f32(w: [&[f32]; 2], x: [&[f32]; 4], out: &mut [[f32; 4]; 2]) {
        let n = w[0].len();
        let mut acc = [[_mm256_setzero_ps(); 4]; 2];
        let mut i = 0;
        while i + 8 <= n {
            let w0 = _mm256_loadu_ps(w[0].as_ptr().add(i));
            let w1 = _mm256_loadu_ps(w[1].as_ptr().add(i));
            for b in 0..4 {
                let xv = _mm256_loadu_ps(x[b].as_ptr().add(i));
                acc[0][b] = _mm256_fmadd_ps(w0, xv, acc[0][b]);
                acc[1][b] = _mm256_fmadd_ps(w1, xv, acc[1][b]);
            }
            i += 8;
        }
        for r in 0..2 {
            for b in 0..4 {
                let mut s = hsum(acc[r][b]);
                for j in i..n {
                    s += w[r][j] * x[b][j];
                }
                out[r][b] = s;
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_f16(w: &[half::f16], x: &[f32]) -> f32 {
        dot_body!(w, x, |p: *const half::f16| _mm256_cvtph_ps(
            _mm_loadu_si128(p as *const __m128i)
        ))
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_bf16(w: &[half::bf16], x: &[f32]) -> f32 {
        dot_body!(w, x, |p: *const half::bf16| _mm256_castsi256_ps(
            _mm256_slli_epi32(
                _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i)),
                16
            )
        ))
    }
}

/// The contiguous f32 data of a CPU tensor, or None.
fn cpu_f32(t: &Tensor) -> Option<Vec<f32>> {
    let (st, l) = t.storage_and_layout();
    let (a, b) = l.contiguous_offsets()?;
    match &*st {
        Storage::Cpu(CpuStorage::F32(v)) => Some(v[a..b].to_vec()),
        _ => None,
    }
}

/// Runs `f` on the contiguous f32 slices of CPU tensors `x` and `y`, or returns None.
fn with_f32_pair<R>(x: &Tensor, y: &Tensor, f: impl FnOnce(&[f32], &[f32]) -> R) -> Option<R> {
    let (xs, xl) = x.storage_and_layout();
    let (ys, yl) = y.storage_and_layout();
    let ((xa, xb), (ya, yb)) = (xl.contiguous_offsets()?, yl.contiguous_offsets()?);
    match (&*xs, &*ys) {
        (Storage::Cpu(CpuStorage::F32(xv)), Storage::Cpu(CpuStorage::F32(yv))) => {
            Some(f(&xv[xa..xb], &yv[ya..yb]))
        }
        _ => None,
    }
}

/// (x + r, rmsnorm(x + r)·w) for f32 CPU tensors (rows, d) in one pass and one allocation, with the same
/// arithmetic, in the same order, as candle's add and rms_norm (so results are bit-identical); None for
/// other dtypes or layouts, which take the separate ops.
pub fn add_rms_norm(
    x: &Tensor,
    r: &Tensor,
    w: &Tensor,
    eps: f32,
) -> candle_core::Result<Option<(Tensor, Tensor)>> {
    if !x.device().is_cpu() || x.dims() != r.dims() || x.rank() != 2 {
        return Ok(None);
    }
    let (rows, d) = x.dims2()?;
    let Some(w) = cpu_f32(w).filter(|w| w.len() == d) else {
        return Ok(None);
    };
    let out = with_f32_pair(x, r, |xv, rv| {
        let mut out = vec![0f32; 2 * rows * d];
        let (sum, normed) = out.split_at_mut(rows * d);
        let row = |s: &mut [f32], o: &mut [f32], xr: &[f32], rr: &[f32]| {
            for ((s, &a), &b) in s.iter_mut().zip(xr).zip(rr) {
                *s = a + b;
            }
            let sum2 = s.iter().map(|&v| v * v).sum::<f32>();
            let m = (sum2 / d as f32 + eps).sqrt();
            for ((o, &v), &a) in o.iter_mut().zip(s.iter()).zip(&w) {
                *o = v / m * a;
            }
        };
        // Small batches on this thread, large ones across the kernel pool (not rayon's: see `crate::pool`).
        let rows_per_task = if rows <= 32 { rows } else { 16 };
        crate::pool::Pool::global().for_chunk_pairs_mut(
            sum,
            normed,
            rows_per_task * d,
            |t, s, o| {
                let first = t * rows_per_task;
                for (j, (s, o)) in s.chunks_mut(d).zip(o.chunks_mut(d)).enumerate() {
                    let r = (first + j) * d;
                    row(s, o, &xv[r..r + d], &rv[r..r + d]);
                }
            },
        );
        out
    });
    let Some(out) = out else { return Ok(None) };
    let out = Tensor::from_vec(out, (2, rows, d), x.device())?;
    Ok(Some((out.get(0)?, out.get(1)?)))
}

/// silu(g)·u for f32 CPU tensors in one pass (with AVX2, a vectorised exp: within a few ulp of candle's
/// silu then mul); None for other dtypes or layouts.
pub fn silu_mul(g: &Tensor, u: &Tensor) -> candle_core::Result<Option<Tensor>> {
    if !g.device().is_cpu() || g.dims() != u.dims() {
        return Ok(None);
    }
    #[cfg(target_arch = "x86_64")]
    let simd = has_avx2();
    let out = with_f32_pair(g, u, |gv, uv| {
        let mut out = vec![0f32; gv.len()];
        // Large inputs across the kernel pool (not rayon's: see `crate::pool`).
        let per_task = if gv.len() < 1 << 16 {
            gv.len()
        } else {
            1 << 14
        };
        crate::pool::Pool::global().for_chunks_mut(&mut out, per_task, |t, o| {
            let (at, n) = (t * per_task, o.len());
            let (g, u) = (&gv[at..at + n], &uv[at..at + n]);
            #[cfg(target_arch = "x86_64")]
            if simd {
                // SAFETY: the CPU has AVX2 and FMA (checked above).
                return unsafe { crate::vmath::avx2::silu_mul(g, u, o) };
            }
            for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                *o = g / (1. + (-g).exp()) * u;
            }
        });
        out
    });
    Ok(match out {
        Some(out) => Some(Tensor::from_vec(out, g.shape(), g.device())?),
        None => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn each_row_takes_its_own_mixes_scales_and_an_unknown_mix_is_refused() {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[1f32, 2., 3.], [4., 5., 6.], [7., 8., 9.]], &dev).unwrap();
        let table = Tensor::new(&[[1f32, 1., 1.], [2., 3., 4.]], &dev).unwrap();
        let rows = crate::llama::RowMixes::new(vec![1, 0, 1], &dev).unwrap();
        let y: Vec<Vec<f32>> = scale_rows(&x, &table, &rows).unwrap().to_vec2().unwrap();
        assert_eq!(y, [[2., 6., 12.], [4., 5., 6.], [14., 24., 36.]]);
        let stale = crate::llama::RowMixes::new(vec![0, 2, 1], &dev).unwrap();
        let e = scale_rows(&x, &table, &stale).unwrap_err().to_string();
        assert!(e.contains("mix id 2 is outside the mix table of 2"), "{e}");
    }

    /// The fused CPU kernels give candle's separate ops' results (add + norm to the bit, silu·up to a few
    /// ulp), at batch sizes on both sides of the switch to the thread pool.
    #[test]
    fn fused_add_norm_and_silu_mul_match_the_separate_ops() {
        let dev = Device::Cpu;
        for rows in [1, 7, 33, 100] {
            let x = Tensor::randn(0f32, 1f32, (rows, 96), &dev).unwrap();
            let r = Tensor::randn(0f32, 1f32, (rows, 96), &dev).unwrap();
            let w = Tensor::randn(1f32, 0.2f32, 96, &dev).unwrap();
            let (sum, normed) = add_rms_norm(&x, &r, &w, 1e-5)
                .unwrap()
                .expect("f32 applies");
            let want_sum = (&x + &r).unwrap();
            let want = candle_nn::ops::rms_norm(&want_sum, &w, 1e-5).unwrap();
            let bits = |t: &Tensor| -> Vec<u32> {
                let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                v.iter().map(|x| x.to_bits()).collect()
            };
            assert_eq!(bits(&sum), bits(&want_sum), "sum, {rows} rows");
            assert_eq!(bits(&normed), bits(&want), "norm, {rows} rows");
            let g = Tensor::randn(0f32, 3f32, (rows, 700), &dev).unwrap();
            let u = Tensor::randn(0f32, 1f32, (rows, 700), &dev).unwrap();
            let got = silu_mul(&g, &u).unwrap().expect("f32 applies");
            let want = (candle_nn::ops::silu(&g).unwrap() * &u).unwrap();
            // The vectorised exp is not libm's: a few ulp apart, never more.
            let (got, want) = (bits(&got), bits(&want));
            let worst = got
                .iter()
                .zip(&want)
                .map(|(&a, &b)| {
                    let (a, b) = (f32::from_bits(a), f32::from_bits(b));
                    (a - b).abs() / b.abs().max(1e-30)
                })
                .fold(0f32, f32::max);
            assert!(worst < 1e-6, "silu·up, {rows} rows: relative error {worst}");
        }
        // Other dtypes are left to the separate ops.
        let h = Tensor::zeros((2, 8), DType::BF16, &dev).unwrap();
        assert!(silu_mul(&h, &h).unwrap().is_none());
    }

    fn check(dtype: DType, m: usize, tol: f32) {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1f32, (m, 77), &dev).unwrap();
        let w = Tensor::randn(0f32, 1f32, (300, 77), &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let want = x
            .matmul(&w.to_dtype(DType::F32).unwrap().t().unwrap())
            .unwrap();
        let got = stream_linear(&x, &w)
            .unwrap()
            .expect("streaming kernel applies");
        let d = (got - &want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < tol, "{dtype:?} m={m}: max diff {d}");
    }

    #[test]
    fn streaming_kernel_matches_gemm() {
        for m in [1, 3, 8, 13, 64] {
            check(DType::F32, m, 1e-4);
            check(DType::F16, m, 1e-3);
            check(DType::BF16, m, 1e-3);
        }
    }

    #[test]
    fn a_rows_result_does_not_depend_on_the_batch() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1f32, (13, 130), &dev).unwrap();
        let w = Tensor::randn(0f32, 1f32, (37, 130), &dev).unwrap();
        let all: Vec<Vec<f32>> = linear(&x, &w).unwrap().to_vec2().unwrap();
        for (i, row) in all.iter().enumerate() {
            let alone: Vec<f32> = linear(&x.narrow(0, i, 1).unwrap(), &w)
                .unwrap()
                .to_vec2()
                .unwrap()
                .remove(0);
            assert_eq!(&alone, row, "row {i}");
        }
    }
}
