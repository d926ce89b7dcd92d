//! y = x·Wᵀ for the few-row products of decoding, on CPU.
//!
//! Decoding is memory-bound: every weight is read once per step and used for only a handful of rows. A
//! general GEMM is built for the opposite case, so here each core streams its own band of W's rows once,
//! dotting every row of x against it while it sits in L1 (AVX2/FMA, with f16/bf16 widened on the fly).
//! Larger batches, other devices and non-contiguous weights go to candle's GEMM.

use candle_core::{CpuStorage, DType, Storage, Tensor};
use rayon::prelude::*;

/// Up to this many rows the streaming kernel is used; above it the product is compute-bound.
pub const MAX_STREAM_ROWS: usize = 8;

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
    if m == 0 || m > MAX_STREAM_ROWS || k != k2 || !x.device().is_cpu() {
        return Ok(None);
    }
    let xs: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
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

/// A weight element the kernels can widen to f32.
pub trait WeightElem: Copy + Send + Sync {
    fn to_f32(self) -> f32;
    /// dot(w, x) over equal-length slices.
    fn dot(w: &[Self], x: &[f32]) -> f32;
}

fn run<T: WeightElem>(w: &[T], xs: &[f32], m: usize, k: usize, out: &mut [f32]) {
    let n = out.len() / m;
    // ~4 bands per thread balances uneven cores without paying much per-task overhead.
    let bands = (rayon::current_num_threads() * 4).max(1);
    let rows_per_band = n.div_ceil(bands).max(16);
    out.par_chunks_mut(rows_per_band * m)
        .enumerate()
        .for_each(|(band, o)| {
            let first = band * rows_per_band;
            for (i, orow) in o.chunks_mut(m).enumerate() {
                let wr = &w[(first + i) * k..(first + i + 1) * k];
                for (b, y) in orow.iter_mut().enumerate() {
                    *y = T::dot(wr, &xs[b * k..(b + 1) * k]);
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

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_f32(w: &[f32], x: &[f32]) -> f32 {
        dot_body!(w, x, |p: *const f32| _mm256_loadu_ps(p))
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

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
        for m in [1, 3, 8] {
            check(DType::F32, m, 1e-4);
            check(DType::F16, m, 1e-3);
            check(DType::BF16, m, 1e-3);
        }
    }

    #[test]
    fn large_batches_fall_back_to_gemm() {
        let x = Tensor::zeros((9, 4), DType::F32, &Device::Cpu).unwrap();
        let w = Tensor::zeros((5, 4), DType::F32, &Device::Cpu).unwrap();
        assert!(stream_linear(&x, &w).unwrap().is_none());
        assert_eq!(linear(&x, &w).unwrap().dims(), &[9, 5]);
    }
}
