//! Vectorised math the CPU kernels share (AVX2 + FMA, 8 lanes; callers check the CPU first).

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use std::arch::x86_64::*;

    /// e^x to about 2 ulp over [-87, 88] (inputs outside are clamped there: e^-87 is 1.6e-38, which no sum
    /// or quotient here can tell from 0, and e^88 is 1.7e38): x = n·ln 2 + r with |r| ≤ ln 2 / 2, e^r by its
    /// degree-6 minimax polynomial (Cephes' expf), 2^n put into the exponent bits.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn exp(x: __m256) -> __m256 {
        let x = _mm256_min_ps(
            _mm256_max_ps(x, _mm256_set1_ps(-87.0)),
            _mm256_set1_ps(88.0),
        );
        let n = _mm256_floor_ps(_mm256_fmadd_ps(
            x,
            _mm256_set1_ps(std::f32::consts::LOG2_E),
            _mm256_set1_ps(0.5),
        ));
        // ln 2 in two parts, so n·ln 2 is subtracted without rounding away r.
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        for c in [1.398_2e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let p = _mm256_fmadd_ps(
            p,
            _mm256_mul_ps(r, r),
            _mm256_add_ps(r, _mm256_set1_ps(1.0)),
        );
        let pow2 = _mm256_slli_epi32(
            _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
            23,
        );
        _mm256_mul_ps(p, _mm256_castsi256_ps(pow2))
    }

    /// out[i] = silu(g[i])·u[i] = g/(1 + e^-g)·u, 8 at a time (the tail through a padded vector).
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn silu_mul(g: &[f32], u: &[f32], out: &mut [f32]) {
        let n = out.len().min(g.len()).min(u.len());
        let one = _mm256_set1_ps(1.0);
        let lanes = |gv: __m256, uv: __m256| {
            let e = exp(_mm256_sub_ps(_mm256_setzero_ps(), gv));
            _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(one, e)), uv)
        };
        let mut i = 0;
        while i + 8 <= n {
            let y = lanes(
                _mm256_loadu_ps(g.as_ptr().add(i)),
                _mm256_loadu_ps(u.as_ptr().add(i)),
            );
            _mm256_storeu_ps(out.as_mut_ptr().add(i), y);
            i += 8;
        }
        if i < n {
            let (mut gt, mut ut, mut yt) = ([0f32; 8], [0f32; 8], [0f32; 8]);
            gt[..n - i].copy_from_slice(&g[i..n]);
            ut[..n - i].copy_from_slice(&u[i..n]);
            _mm256_storeu_ps(
                yt.as_mut_ptr(),
                lanes(_mm256_loadu_ps(gt.as_ptr()), _mm256_loadu_ps(ut.as_ptr())),
            );
            out[i..n].copy_from_slice(&yt[..n - i]);
        }
    }
}
