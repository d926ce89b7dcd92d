//! Attention on CPU for rows that each attend over their own sequence's cached prefix: decode rows, and
//! the rows of a short prompt chunk (whose causal prefix ends at the row itself). One call per layer.
//!
//! A task is one (row, KV head) pair with all the query heads that share that KV head (grouped-query
//! attention): each cached key and value is read once per group, not once per query head. With AVX2 and
//! FMA (chosen at run time) the scores, a vectorised exp and the weighted sum of values run 8 lanes wide;
//! elsewhere a scalar loop does the same. What a row computes never depends on the other rows of its step
//! or on which thread runs it, so batching stays invisible in its result.

use candle_core::{CpuStorage, DType, Storage, Tensor};

/// One row's KV for [`attention_rows`]: its sequence's blocks in position order and how many positions
/// to attend over (the row's own included).
pub struct BlockKv<'a> {
    pub blocks: &'a [u32],
    pub len: usize,
}

/// A contiguous f32 CPU tensor's storage guard and start offset, or None.
fn f32_data(t: &Tensor) -> Option<(impl std::ops::Deref<Target = Storage> + '_, usize)> {
    let (s, l) = t.storage_and_layout();
    let (start, _) = l.contiguous_offsets()?;
    matches!(&*s, Storage::Cpu(CpuStorage::F32(_))).then_some((s, start))
}

/// The attention of many new rows at once, each over its own sequence's first `len` positions: q is
/// (rows, heads, head_dim) f32, contiguous, with `seqs[i]` row i's KV; the layer's pool K and V are
/// (blocks·kv_heads·block_size, head_dim), head-major within a block (see `crate::kv`); returns
/// (rows, heads·head_dim). None where this CPU/f32 path does not apply.
pub fn attention_rows(
    q: &Tensor,
    k_pool: &Tensor,
    v_pool: &Tensor,
    seqs: &[BlockKv<'_>],
    group: usize,
) -> candle_core::Result<Option<Tensor>> {
    if !q.device().is_cpu() || q.dtype() != DType::F32 || !q.is_contiguous() {
        return Ok(None);
    }
    let (n, heads, d) = q.dims3()?;
    let group = group.max(1);
    let kv_heads = heads / group;
    let rows = k_pool.dim(0)?;
    let bs = crate::kv::BLOCK_SIZE;
    let fits = |s: &BlockKv<'_>| {
        s.len > 0
            && s.len <= s.blocks.len() * bs
            && s.blocks
                .iter()
                .all(|&b| (b as usize + 1) * kv_heads * bs <= rows)
    };
    if n != seqs.len() || k_pool.dim(1)? != d || kv_heads * group != heads || !seqs.iter().all(fits)
    {
        return Ok(None);
    }
    let (Some((qs, q0)), Some((ks, k0)), Some((vs, v0))) =
        (f32_data(q), f32_data(k_pool), f32_data(v_pool))
    else {
        return Ok(None);
    };
    let (
        Storage::Cpu(CpuStorage::F32(qv)),
        Storage::Cpu(CpuStorage::F32(kv)),
        Storage::Cpu(CpuStorage::F32(vv)),
    ) = (&*qs, &*ks, &*vs)
    else {
        return Ok(None);
    };
    let (qv, kv, vv) = (&qv[q0..], &kv[k0..], &vv[v0..]);
    let scale = 1.0 / (d as f32).sqrt();
    let simd = Simd::detect(d);
    let mut out = vec![0f32; n * heads * d];
    let pool = crate::pool::Pool::global();
    // Tasks are (row, KV head) pairs: a group's query heads and outputs are adjacent in q and out.
    let tasks = n * kv_heads;
    let per_run = tasks.div_ceil(pool.threads() * 4);
    let longest = seqs.iter().map(|c| c.len).max().unwrap_or(0);
    pool.for_chunks_mut(&mut out, per_run * group * d, |t, run| {
        let mut scores = vec![0f32; group * longest];
        for (j, o) in run.chunks_mut(group * d).enumerate() {
            let i = t * per_run + j;
            let (row, kvh) = (i / kv_heads, i % kv_heads);
            let s = &seqs[row];
            let at = |p: usize| ((s.blocks[p / bs] as usize * kv_heads + kvh) * bs + p % bs) * d;
            let q = &qv[i * group * d..(i + 1) * group * d];
            let job = Group {
                q,
                k: kv,
                v: vv,
                len: s.len,
                d,
                scale,
            };
            job.run(simd, &at, &mut scores[..group * s.len], o);
        }
    });
    drop((qs, ks, vs));
    Ok(Some(Tensor::from_vec(out, (n, heads * d), q.device())?))
}

/// Which loops [`Group::run`] takes, decided once per call.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Simd {
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Scalar,
}

impl Simd {
    fn detect(d: usize) -> Simd {
        #[cfg(target_arch = "x86_64")]
        if d.is_multiple_of(8)
            && is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
        {
            return Simd::Avx2;
        }
        let _ = d;
        Simd::Scalar
    }
}

/// The query heads of one KV group (g·d values) against the first `len` cached positions.
struct Group<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    len: usize,
    d: usize,
    scale: f32,
}

impl Group<'_> {
    /// o (g·d) = softmax(K·q·scale)·V for each query head; `scores` holds g·len, `at(p)` is where
    /// position p's key (and value) starts.
    fn run(&self, simd: Simd, at: &dyn Fn(usize) -> usize, scores: &mut [f32], o: &mut [f32]) {
        match simd {
            // SAFETY: AVX2 and FMA are present and d is a multiple of 8 (checked in `Simd::detect`).
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2 => unsafe { avx2::run(self, at, scores, o) },
            Simd::Scalar => self.run_scalar(at, scores, o),
        }
    }

    fn run_scalar(&self, at: &dyn Fn(usize) -> usize, scores: &mut [f32], o: &mut [f32]) {
        let (d, len) = (self.d, self.len);
        for p in 0..len {
            let key = &self.k[at(p)..at(p) + d];
            for (h, qh) in self.q.chunks_exact(d).enumerate() {
                let dot: f32 = key.iter().zip(qh).map(|(a, b)| a * b).sum();
                scores[h * len + p] = dot * self.scale;
            }
        }
        for (h, oh) in o.chunks_exact_mut(d).enumerate() {
            let s = &mut scores[h * len..(h + 1) * len];
            let max = s.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            let mut sum = 0f32;
            for x in s.iter_mut() {
                *x = (*x - max).exp();
                sum += *x;
            }
            oh.fill(0.0);
            for (p, &w) in s.iter().enumerate() {
                let value = &self.v[at(p)..at(p) + d];
                oh.iter_mut().zip(value).for_each(|(a, &b)| *a += w * b);
            }
            let inv = 1.0 / sum;
            oh.iter_mut().for_each(|a| *a *= inv);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::Group;
    use crate::vmath::avx2::exp;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn hmax(v: __m256) -> f32 {
        let s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_max_ss(s, _mm_shuffle_ps(s, s, 1)))
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn run(
        g: &Group<'_>,
        at: &dyn Fn(usize) -> usize,
        scores: &mut [f32],
        o: &mut [f32],
    ) {
        let (d, len) = (g.d, g.len);
        let (k, v, q) = (g.k.as_ptr(), g.v.as_ptr(), g.q.as_ptr());
        let heads = g.q.len() / d;
        // Scores: each key is read once for the whole group; two accumulators per dot.
        for p in 0..len {
            let key = k.add(at(p));
            for h in 0..heads {
                let qh = q.add(h * d);
                let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                let mut c = 0;
                while c + 16 <= d {
                    a0 = _mm256_fmadd_ps(
                        _mm256_loadu_ps(key.add(c)),
                        _mm256_loadu_ps(qh.add(c)),
                        a0,
                    );
                    a1 = _mm256_fmadd_ps(
                        _mm256_loadu_ps(key.add(c + 8)),
                        _mm256_loadu_ps(qh.add(c + 8)),
                        a1,
                    );
                    c += 16;
                }
                if c < d {
                    a0 = _mm256_fmadd_ps(
                        _mm256_loadu_ps(key.add(c)),
                        _mm256_loadu_ps(qh.add(c)),
                        a0,
                    );
                }
                *scores.get_unchecked_mut(h * len + p) = hsum(_mm256_add_ps(a0, a1)) * g.scale;
            }
        }
        // Per head: softmax weights, unnormalised (the sum divides the output once at the end), then the
        // weighted values, 64 output lanes (8 registers) at a time.
        let out = o.as_mut_ptr();
        for h in 0..heads {
            let s = scores.as_mut_ptr().add(h * len);
            let mut m = _mm256_set1_ps(f32::NEG_INFINITY);
            let mut p = 0;
            while p + 8 <= len {
                m = _mm256_max_ps(m, _mm256_loadu_ps(s.add(p)));
                p += 8;
            }
            let mut max = hmax(m);
            for j in p..len {
                max = max.max(*s.add(j));
            }
            let mut total = _mm256_setzero_ps();
            let mut p = 0;
            while p + 8 <= len {
                let e = exp(_mm256_sub_ps(
                    _mm256_loadu_ps(s.add(p)),
                    _mm256_set1_ps(max),
                ));
                _mm256_storeu_ps(s.add(p), e);
                total = _mm256_add_ps(total, e);
                p += 8;
            }
            let mut sum = hsum(total);
            if p < len {
                // The tail through the same vector exp, so every weight is computed alike.
                let mut tail = [f32::NEG_INFINITY; 8];
                tail[..len - p].copy_from_slice(std::slice::from_raw_parts(s.add(p), len - p));
                let e = exp(_mm256_sub_ps(
                    _mm256_loadu_ps(tail.as_ptr()),
                    _mm256_set1_ps(max),
                ));
                _mm256_storeu_ps(tail.as_mut_ptr(), e);
                for (j, &w) in tail[..len - p].iter().enumerate() {
                    *s.add(p + j) = w;
                    sum += w;
                }
            }
            let inv = 1.0 / sum;
            let mut c0 = 0;
            while c0 < d {
                let lanes = (d - c0).min(64) / 8;
                let mut acc = [_mm256_setzero_ps(); 8];
                for p in 0..len {
                    let w = _mm256_set1_ps(*s.add(p));
                    let value = v.add(at(p) + c0);
                    for (r, a) in acc.iter_mut().enumerate().take(lanes) {
                        *a = _mm256_fmadd_ps(w, _mm256_loadu_ps(value.add(8 * r)), *a);
                    }
                }
                let inv = _mm256_set1_ps(inv);
                for (r, a) in acc.iter().enumerate().take(lanes) {
                    _mm256_storeu_ps(out.add(h * d + c0 + 8 * r), _mm256_mul_ps(*a, inv));
                }
                c0 += 64;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Softmax attention in f64, one head and row at a time, straight from the definition.
    fn reference(q: &[f32], k: &[f32], v: &[f32], len: usize, d: usize, heads: usize) -> Vec<f64> {
        let mut out = vec![0f64; heads * d];
        for h in 0..heads {
            let s: Vec<f64> = (0..len)
                .map(|p| {
                    (0..d)
                        .map(|c| q[h * d + c] as f64 * k[p * d + c] as f64)
                        .sum::<f64>()
                        / (d as f64).sqrt()
                })
                .collect();
            let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            for p in 0..len {
                for c in 0..d {
                    out[h * d + c] += e[p] / sum * v[p * d + c] as f64;
                }
            }
        }
        out
    }

    /// Every kernel this CPU can run agrees with the f64 definition, over lengths that leave vector tails
    /// and score ranges wide enough that some weights underflow.
    #[test]
    fn grouped_attention_matches_the_definition() {
        let (d, heads) = (64, 3);
        let mut simds = vec![Simd::Scalar];
        if Simd::detect(d) != Simd::Scalar {
            simds.push(Simd::detect(d));
        }
        let val = |i: usize, spread: f32| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * spread;
        for len in [1, 7, 8, 9, 33, 200] {
            for spread in [0.1f32, 3.0] {
                let q: Vec<f32> = (0..heads * d).map(|i| val(i + 3, spread)).collect();
                let k: Vec<f32> = (0..len * d).map(|i| val(i * 3 + 1, spread)).collect();
                let v: Vec<f32> = (0..len * d).map(|i| val(i * 5 + 2, 1.0)).collect();
                let want = reference(&q, &k, &v, len, d, heads);
                for &simd in &simds {
                    let g = Group {
                        q: &q,
                        k: &k,
                        v: &v,
                        len,
                        d,
                        scale: 1.0 / (d as f32).sqrt(),
                    };
                    let mut scores = vec![0f32; heads * len];
                    let mut o = vec![0f32; heads * d];
                    g.run(simd, &|p| p * d, &mut scores, &mut o);
                    let worst = o
                        .iter()
                        .zip(&want)
                        .map(|(&a, &b)| (a as f64 - b).abs())
                        .fold(0f64, f64::max);
                    assert!(worst < 1e-5, "len {len} spread {spread}: off by {worst}");
                }
            }
        }
    }
}
