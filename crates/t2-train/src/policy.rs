//! The model as a differentiable function of the SVF logits.
//!
//! The serving forward (`t2_model::Llama::forward`) runs on hand-written kernels and a KV cache, which
//! autograd cannot see through. Training needs log π(y|x) with gradients reaching z, so this is the same
//! decoder written with plain candle ops over a padded batch: embeddings → [RMSNorm → attention (RoPE,
//! grouped-query, causal) → residual → RMSNorm → SiLU-gated MLP → residual] × L → RMSNorm → lm_head.
//! Each adapted matrix multiplies in factored form, y = ((x·V)⊙s)·Uᵀ with s = σ⊙z·(Σσ/Σ(σ⊙z)) and
//! z = sigmoid(p), so the only trainable numbers are the logits p. A test checks these log-probabilities
//! against the serving forward.

use std::borrow::Borrow;
use std::collections::BTreeMap;

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor, Var, D};
use t2_adapt::cem::standard_normal;
use t2_model::llama::{rope_tables, Linear};
use t2_model::{Llama, ProjId, RopeStyle};
use t2_svf::{Decomposition, TargetSet};

pub type Result<T> = candle_core::Result<T>;

/// The trainable logits p, one vector per adapted matrix (z = sigmoid(p)).
pub struct SvfLogits {
    pub p: BTreeMap<ProjId, Var>,
}

impl SvfLogits {
    /// p = mean + std·N(0,1), seeded. The paper's start (mean 0.1, std 0.01) gives z ≈ 0.525 everywhere,
    /// which the Σσ-preserving rescale turns back into (almost exactly) the base model.
    pub fn init(
        decomp: &Decomposition,
        targets: TargetSet,
        seed: u64,
        mean: f32,
        std: f32,
    ) -> Result<Self> {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut p = BTreeMap::new();
        for (id, f) in decomp
            .factors
            .iter()
            .filter(|(id, _)| targets.contains(id.kind))
        {
            let v: Vec<f32> = (0..f.rank())
                .map(|_| mean + std * standard_normal(&mut rng))
                .collect();
            let n = v.len();
            p.insert(*id, Var::from_vec(v, n, &Device::Cpu)?);
        }
        Ok(Self { p })
    }

    /// Wraps stored logits (a checkpoint) as trainable variables.
    pub fn from_host(p: BTreeMap<ProjId, Vec<f32>>) -> Result<Self> {
        let p = p
            .into_iter()
            .map(|(id, v)| {
                let n = v.len();
                Ok((id, Var::from_vec(v, n, &Device::Cpu)?))
            })
            .collect::<Result<_>>()?;
        Ok(Self { p })
    }

    pub fn to_host(&self) -> Result<BTreeMap<ProjId, Vec<f32>>> {
        self.p
            .iter()
            .map(|(id, v)| Ok((*id, v.as_tensor().to_vec1::<f32>()?)))
            .collect()
    }

    /// z = sigmoid(p) on the host: what an expert file stores and what the engine serves.
    pub fn z_host(&self) -> Result<BTreeMap<ProjId, Vec<f32>>> {
        Ok(self
            .to_host()?
            .into_iter()
            .map(|(id, p)| (id, p.into_iter().map(sigmoid).collect()))
            .collect())
    }

    pub fn vars(&self) -> impl Iterator<Item = (&ProjId, &Var)> {
        self.p.iter()
    }

    pub fn len(&self) -> usize {
        self.p.values().map(|v| v.elem_count()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.p.is_empty()
    }
}

pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

pub fn logit(z: f32) -> f32 {
    (z / (1.0 - z)).ln()
}

/// One sequence to score: log π(tokens[from..] | tokens[..from]).
#[derive(Debug, Clone)]
pub struct Scored {
    pub tokens: Vec<u32>,
    pub from: usize,
}

/// A prompt and the continuations scored after it (a multiple-choice item's options), packed into one row:
/// each continuation sees the prompt and its own earlier tokens, at the positions it would have alone, so
/// the prompt is computed once rather than once per continuation.
#[derive(Debug, Clone)]
pub struct Branched {
    pub prompt: Vec<u32>,
    pub branches: Vec<Vec<u32>>,
}

impl Branched {
    /// The row's tokens, each one's position, and which branch it is in (None: the prompt).
    fn row(&self) -> (Vec<u32>, Vec<u32>, Vec<Option<usize>>) {
        let mut tokens = self.prompt.clone();
        let mut positions: Vec<u32> = (0..self.prompt.len() as u32).collect();
        let mut branch = vec![None; self.prompt.len()];
        for (j, b) in self.branches.iter().enumerate() {
            tokens.extend(b);
            positions.extend((0..b.len()).map(|m| (self.prompt.len() + m) as u32));
            branch.extend(std::iter::repeat_n(Some(j), b.len()));
        }
        (tokens, positions, branch)
    }
}

/// The scored positions of a batch: per-token log-probabilities (flat, sequence after sequence) and,
/// when asked for, the full log-softmax rows (for the KL penalty).
pub struct ScoredBatch {
    pub token_logprobs: Tensor,
    pub spans: Vec<(usize, usize)>,
    pub log_softmax: Option<Tensor>,
}

/// What `Policy::branch_scores` gives: per item, its branches' summed log-probabilities; and the
/// log-softmax rows of every scored position when asked for.
pub struct BranchScores {
    pub sums: Vec<Tensor>,
    pub log_softmax: Option<Tensor>,
}

/// The mean over positions of KL(p ‖ q) = Σ_v p(v)·(log p(v) − log q(v)), from log-softmax rows of the
/// same positions: the adapted model's `lp` (differentiable) against the base model's `lq` (held fixed).
pub fn mean_kl(lp: &Tensor, lq: &Tensor) -> Result<Tensor> {
    (lp.exp()? * (lp - lq.detach())?)?.sum(1)?.mean_all()
}

pub struct Policy<'a> {
    model: &'a Llama,
    decomp: &'a Decomposition,
    cos: Tensor,
    sin: Tensor,
}

impl<'a> Policy<'a> {
    pub fn new(model: &'a Llama, decomp: &'a Decomposition, max_len: usize) -> Result<Self> {
        if model.dtype() != DType::F32 {
            candle_core::bail!(
                "training needs the model in f32 (it is {:?})",
                model.dtype()
            );
        }
        let mut cfg = model.cfg.clone();
        cfg.max_position_embeddings = max_len;
        let (cos, sin) = rope_tables(&cfg, DType::F32, model.device())?;
        Ok(Self {
            model,
            decomp,
            cos,
            sin,
        })
    }

    /// Log-probabilities of the scored tokens of every sequence, under the model adapted by `logits`
    /// (the base model when `None`). Differentiable in the logits.
    pub fn score(
        &self,
        logits: Option<&SvfLogits>,
        batch: &[Scored],
        want_log_softmax: bool,
    ) -> Result<ScoredBatch> {
        let dev = self.model.device();
        let b = batch.len();
        let t = batch.iter().map(|s| s.tokens.len()).max().unwrap_or(0);
        if b == 0 || t < 2 {
            candle_core::bail!("nothing to score");
        }
        if t > self.cos.dim(0)? {
            candle_core::bail!(
                "a sequence of {t} tokens is longer than the policy's {}",
                self.cos.dim(0)?
            );
        }
        let mut ids = vec![0u32; b * t];
        let mut rows = Vec::new();
        let mut targets = Vec::new();
        let mut spans = Vec::with_capacity(b);
        for (i, s) in batch.iter().enumerate() {
            if s.from == 0 || s.from >= s.tokens.len() {
                candle_core::bail!("scored span must leave a prefix and score at least one token");
            }
            ids[i * t..i * t + s.tokens.len()].copy_from_slice(&s.tokens);
            spans.push((rows.len(), s.tokens.len() - s.from));
            for p in s.from..s.tokens.len() {
                rows.push((i * t + p - 1) as u32);
                targets.push(s.tokens[p]);
            }
        }
        let scales = match logits {
            Some(l) => Some(self.scales(l)?),
            None => None,
        };
        let x = self.hidden(&scales, ids, b, t, None)?;
        let n = rows.len();
        let rows = Tensor::from_vec(rows, n, dev)?;
        let h = x.index_select(&rows, 0)?;
        let h = rms_norm(&h, &self.model.norm.weight, self.model.norm.eps)?;
        let logits = const_linear(&h, &self.model.lm_head)?;
        let log_softmax = log_softmax_last(&logits)?;
        let targets = Tensor::from_vec(targets, (n, 1), dev)?;
        let token_logprobs = log_softmax.gather(&targets, 1)?.squeeze(1)?;
        Ok(ScoredBatch {
            token_logprobs,
            spans,
            log_softmax: want_log_softmax.then_some(log_softmax),
        })
    }

    /// For each item, the summed log-probability of each of its branches after its prompt, as a
    /// (branches,) tensor, under the model adapted by `logits` (the base model when `None`): what scoring
    /// prompt + branch as a sequence of its own gives, from one row per item. Differentiable in the logits.
    pub fn branch_logprobs<B: Borrow<Branched>>(
        &self,
        logits: Option<&SvfLogits>,
        items: &[B],
    ) -> Result<Vec<Tensor>> {
        Ok(self.branch_scores(logits, items, false)?.sums)
    }

    /// `branch_logprobs`, and when asked for, the full log-softmax rows at every branch token's position
    /// (item after item, branch after branch), for the KL penalty.
    pub fn branch_scores<B: Borrow<Branched>>(
        &self,
        logits: Option<&SvfLogits>,
        items: &[B],
        want_log_softmax: bool,
    ) -> Result<BranchScores> {
        // Callers hold their items inside larger records: borrowing spares copying every token list.
        let items: Vec<&Branched> = items.iter().map(Borrow::borrow).collect();
        let dev = self.model.device();
        let b = items.len();
        if b == 0
            || items.iter().any(|it| {
                it.prompt.is_empty()
                    || it.branches.is_empty()
                    || it.branches.iter().any(Vec::is_empty)
            })
        {
            candle_core::bail!("nothing to score");
        }
        let longest = items
            .iter()
            .map(|it| it.prompt.len() + it.branches.iter().map(Vec::len).max().unwrap_or(0))
            .max()
            .unwrap_or(0);
        if longest > self.cos.dim(0)? {
            candle_core::bail!(
                "a sequence of {longest} tokens is longer than the policy's {}",
                self.cos.dim(0)?
            );
        }
        let rows: Vec<_> = items.iter().map(|it| it.row()).collect();
        let t = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
        let mut ids = vec![0u32; b * t];
        let mut positions = vec![0u32; b * t];
        let mut mask = vec![-1e30f32; b * t * t];
        let (mut from, mut targets) = (Vec::<u32>::new(), Vec::<u32>::new());
        // Per item, each branch's first target.
        let mut starts = Vec::with_capacity(b);
        for (i, (it, (tokens, pos, branch))) in items.iter().zip(&rows).enumerate() {
            let len = tokens.len();
            ids[i * t..i * t + len].copy_from_slice(tokens);
            positions[i * t..i * t + len].copy_from_slice(pos);
            for q in 0..t {
                for k in 0..=q {
                    // The prompt sees its own past; a branch sees the prompt and its own past; padding
                    // (after the row) sees everything before it, as under the plain causal mask.
                    let sees = q >= len || branch[k].is_none() || branch[k] == branch[q];
                    if sees {
                        mask[(i * t + q) * t + k] = 0.0;
                    }
                }
            }
            let mut first = Vec::with_capacity(it.branches.len());
            let mut at = it.prompt.len();
            for br in &it.branches {
                first.push(targets.len());
                from.push((i * t + it.prompt.len() - 1) as u32);
                for m in 1..br.len() {
                    from.push((i * t + at + m - 1) as u32);
                }
                targets.extend(br);
                at += br.len();
            }
            starts.push(first);
        }
        let scales = match logits {
            Some(l) => Some(self.scales(l)?),
            None => None,
        };
        let packed = (
            Tensor::from_vec(positions, b * t, dev)?,
            Tensor::from_vec(mask, (b, 1, t, t), dev)?,
        );
        let x = self.hidden(&scales, ids, b, t, Some(packed))?;
        let n = from.len();
        let h = x.index_select(&Tensor::from_vec(from, n, dev)?, 0)?;
        let h = rms_norm(&h, &self.model.norm.weight, self.model.norm.eps)?;
        let log_softmax = log_softmax_last(&const_linear(&h, &self.model.lm_head)?)?;
        let token_logprobs = log_softmax
            .gather(&Tensor::from_vec(targets, (n, 1), dev)?, 1)?
            .squeeze(1)?;
        let sums = items
            .iter()
            .zip(&starts)
            .map(|(it, first)| {
                let sums = it
                    .branches
                    .iter()
                    .zip(first)
                    .map(|(br, &f)| token_logprobs.narrow(0, f, br.len())?.sum_all())
                    .collect::<Result<Vec<_>>>()?;
                Tensor::stack(&sums, 0)
            })
            .collect::<Result<_>>()?;
        Ok(BranchScores {
            sums,
            log_softmax: want_log_softmax.then_some(log_softmax),
        })
    }

    /// The last hidden states (before the final norm) of a right-padded (b, t) batch, as (b·t, hidden).
    /// `packed`: each row's positions (b·t) and attention mask (b, 1, t, t), for rows that are not one
    /// plain causal sequence (None: positions 0..t under the causal mask).
    fn hidden(
        &self,
        scales: &Option<BTreeMap<ProjId, Tensor>>,
        ids: Vec<u32>,
        b: usize,
        t: usize,
        packed: Option<(Tensor, Tensor)>,
    ) -> Result<Tensor> {
        // Right padding: the causal mask already hides every pad from the real positions before it.
        let dev = self.model.device();
        let cfg = &self.model.cfg;
        let ids = Tensor::from_vec(ids, b * t, dev)?;
        // Nothing upstream of the embeddings trains: detached, the backward pass stops here instead of
        // scattering a gradient into a copy of the whole embedding table.
        let mut x = self.model.embed.index_select(&ids, 0)?.detach();
        let half = cfg.head_dim / 2;
        let (mask, cos, sin) = match packed {
            None => (
                causal_mask(t, dev)?,
                self.cos.narrow(0, 0, t)?.reshape((1, t, 1, half))?,
                self.sin.narrow(0, 0, t)?.reshape((1, t, 1, half))?,
            ),
            Some((positions, mask)) => (
                mask,
                self.cos
                    .index_select(&positions, 0)?
                    .reshape((b, t, 1, half))?,
                self.sin
                    .index_select(&positions, 0)?
                    .reshape((b, t, 1, half))?,
            ),
        };
        for block in &self.model.blocks {
            let h = rms_norm(&x, &block.attn_norm.weight, block.attn_norm.eps)?;
            let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
            let q = self
                .linear(&block.attn.q, &h, scales)?
                .reshape((b, t, nh, hd))?;
            let k = self
                .linear(&block.attn.k, &h, scales)?
                .reshape((b, t, nkv, hd))?;
            let v = self
                .linear(&block.attn.v, &h, scales)?
                .reshape((b, t, nkv, hd))?;
            // Qwen3's per-head q/k norms come before RoPE.
            let head_norm = |x: Tensor, n: &Option<t2_model::llama::RmsNorm>| match n {
                Some(n) => rms_norm(&x, &n.weight, n.eps),
                None => Ok(x),
            };
            let q = head_norm(q, &block.attn.q_norm)?;
            let k = head_norm(k, &block.attn.k_norm)?;
            let q = rope(&q, &cos, &sin, cfg.rope_style)?
                .transpose(1, 2)?
                .contiguous()?;
            let k = rope(&k, &cos, &sin, cfg.rope_style)?.transpose(1, 2)?;
            let v = v.transpose(1, 2)?;
            let g = nh / nkv;
            let k = repeat_kv(&k, g)?;
            let v = repeat_kv(&v, g)?;
            let att = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?.broadcast_add(&mask)?;
            let att = softmax_last(&att)?;
            let out = att.matmul(&v)?.transpose(1, 2)?.reshape((b * t, nh * hd))?;
            x = (x + self.linear(&block.attn.o, &out, scales)?)?;
            let h = rms_norm(&x, &block.mlp_norm.weight, block.mlp_norm.eps)?;
            let gate = self.linear(&block.mlp.gate, &h, scales)?.silu()?;
            let up = self.linear(&block.mlp.up, &h, scales)?;
            x = (x + self.linear(&block.mlp.down, &(gate * up)?, scales)?)?;
        }
        Ok(x)
    }

    /// For each prompt, log π(c | prompt) of each candidate next token, renormalised over the candidates:
    /// a policy over a few labels that differ at their first token, read from one forward per prompt.
    /// Returns (prompts, candidates).
    pub fn candidate_logprobs(
        &self,
        logits: Option<&SvfLogits>,
        prompts: &[Vec<u32>],
        candidates: &[u32],
    ) -> Result<Tensor> {
        let each = vec![candidates.to_vec(); prompts.len()];
        self.candidate_logprobs_each(logits, prompts, &each)
    }

    /// As [`Self::candidate_logprobs`], with each prompt's own candidates (multiple-choice items with 3
    /// to 5 options). Returns (prompts, most candidates); a row's entries past its own candidates are −∞,
    /// so they carry no probability, are never the greedy pick and get no gradient.
    pub fn candidate_logprobs_each(
        &self,
        logits: Option<&SvfLogits>,
        prompts: &[Vec<u32>],
        candidates: &[Vec<u32>],
    ) -> Result<Tensor> {
        let dev = self.model.device();
        let b = prompts.len();
        let t = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let k = candidates.iter().map(Vec::len).max().unwrap_or(0);
        if b == 0
            || t == 0
            || k == 0
            || candidates.len() != b
            || candidates.iter().any(Vec::is_empty)
        {
            candle_core::bail!("nothing to score");
        }
        let mut ids = vec![0u32; b * t];
        let mut rows = Vec::with_capacity(b);
        for (i, p) in prompts.iter().enumerate() {
            ids[i * t..i * t + p.len()].copy_from_slice(p);
            rows.push((i * t + p.len() - 1) as u32);
        }
        // The output head's rows of every candidate of the batch, once; each row then gathers its own.
        let mut union: Vec<u32> = candidates.iter().flatten().copied().collect();
        union.sort_unstable();
        union.dedup();
        let mut index = Vec::with_capacity(b * k);
        let mut mask = Vec::with_capacity(b * k);
        for c in candidates {
            for j in 0..k {
                match c.get(j) {
                    Some(tok) => {
                        index.push(union.binary_search(tok).expect("in the union") as u32);
                        mask.push(0f32);
                    }
                    None => {
                        index.push(0);
                        mask.push(f32::NEG_INFINITY);
                    }
                }
            }
        }
        let scales = match logits {
            Some(l) => Some(self.scales(l)?),
            None => None,
        };
        let x = self.hidden(&scales, ids, b, t, None)?;
        let h = x.index_select(&Tensor::from_vec(rows, b, dev)?, 0)?;
        let h = rms_norm(&h, &self.model.norm.weight, self.model.norm.eps)?;
        let picked = self
            .model
            .lm_head
            .index_select(&Tensor::from_slice(&union, union.len(), dev)?, 0)?;
        // Only the candidates' rows of the output head matter once renormalised over them.
        let all = const_linear(&h, &picked)?;
        let mine = all.gather(&Tensor::from_vec(index, (b, k), dev)?, 1)?;
        let masked = (mine + Tensor::from_vec(mask, (b, k), dev)?.to_dtype(all.dtype())?)?;
        log_softmax_last(&masked)
    }

    /// s = σ⊙z·(Σσ/Σ(σ⊙z)) per adapted matrix, as (1, r) rows, in the graph.
    fn scales(&self, logits: &SvfLogits) -> Result<BTreeMap<ProjId, Tensor>> {
        let mut out = BTreeMap::new();
        for (id, p) in logits.vars() {
            let Some(f) = self.decomp.factors.get(id) else {
                candle_core::bail!("no decomposition for {}", id.name());
            };
            let z = (p.as_tensor().neg()?.exp()? + 1.0)?.recip()?;
            let sz = (&f.sigma * z)?;
            let total: f32 = f.sigma_host.iter().sum();
            let s = sz.broadcast_mul(&(sz.sum_all()?.recip()? * total as f64)?)?;
            out.insert(*id, s.unsqueeze(0)?);
        }
        Ok(out)
    }

    fn linear(
        &self,
        lin: &Linear,
        x: &Tensor,
        scales: &Option<BTreeMap<ProjId, Tensor>>,
    ) -> Result<Tensor> {
        let y = match scales.as_ref().and_then(|s| s.get(&lin.id)) {
            Some(s) => {
                let f = &self.decomp.factors[&lin.id];
                const_linear(&const_linear(x, f.vt()?)?.broadcast_mul(s)?, f.u()?)?
            }
            None => const_linear(x, lin.weight()?)?,
        };
        match &lin.bias {
            Some(bias) => y.broadcast_add(bias),
            None => Ok(y),
        }
    }
}

fn causal_mask(t: usize, dev: &Device) -> Result<Tensor> {
    // A large negative number rather than -inf: exp underflows to exactly 0 either way, and no inf − inf
    // can turn into NaN in the backward pass.
    let m: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j > i { -1e30 } else { 0.0 }))
        .collect();
    Tensor::from_vec(m, (t, t), dev)
}

fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(ms + eps as f64)?.sqrt()?)?
        .broadcast_mul(w)
}

/// x: (b, t, heads, d); cos, sin: (1 or b, t, 1, d/2).
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, style: RopeStyle) -> Result<Tensor> {
    let (b, t, h, d) = x.dims4()?;
    let half = d / 2;
    match style {
        RopeStyle::Interleaved => {
            let pairs = x.reshape((b, t, h, half, 2))?;
            let x0 = pairs.narrow(4, 0, 1)?.squeeze(4)?;
            let x1 = pairs.narrow(4, 1, 1)?.squeeze(4)?;
            let y0 = (x0.broadcast_mul(cos)? - x1.broadcast_mul(sin)?)?;
            let y1 = (x0.broadcast_mul(sin)? + x1.broadcast_mul(cos)?)?;
            Tensor::stack(&[y0, y1], 4)?.reshape((b, t, h, d))
        }
        RopeStyle::Half => {
            let x0 = x.narrow(3, 0, half)?;
            let x1 = x.narrow(3, half, half)?;
            let y0 = (x0.broadcast_mul(cos)? - x1.broadcast_mul(sin)?)?;
            let y1 = (x0.broadcast_mul(sin)? + x1.broadcast_mul(cos)?)?;
            Tensor::cat(&[y0, y1], 3)
        }
    }
}

/// (b, kv_heads, t, d) → (b, kv_heads·g, t, d): query head i reads kv head i / g.
fn repeat_kv(x: &Tensor, g: usize) -> Result<Tensor> {
    if g == 1 {
        return Ok(x.clone());
    }
    let (b, kv, t, d) = x.dims4()?;
    x.unsqueeze(2)?
        .broadcast_as((b, kv, g, t, d))?
        .contiguous()?
        .reshape((b, kv * g, t, d))
}

fn softmax_last(x: &Tensor) -> Result<Tensor> {
    // The max is a constant shift: detached, so autograd sees the plain softmax.
    let m = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&m)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

fn log_softmax_last(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&m)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)
}

/// y = x·Wᵀ for a constant W (out, in), whose backward pass gives ∂/∂x only. Candle's matmul backward
/// also computes ∂/∂W, a second product as large as the forward one, for weights that never train.
fn const_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(ConstLinear { w: w.clone() })
}

struct ConstLinear {
    w: Tensor,
}

impl CustomOp1 for ConstLinear {
    fn name(&self) -> &'static str {
        "const-linear"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("const-linear runs in f32");
        };
        let Some((a, b)) = layout.contiguous_offsets() else {
            candle_core::bail!("const-linear wants a contiguous input");
        };
        let x = Tensor::from_slice(&data[a..b], layout.shape(), &Device::Cpu)?;
        let y = x.broadcast_matmul(&self.w.t()?)?;
        let shape = y.shape().clone();
        Ok((CpuStorage::F32(y.flatten_all()?.to_vec1::<f32>()?), shape))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.broadcast_matmul(&self.w)?))
    }
}
