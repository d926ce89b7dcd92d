//! The Llama-family decoder (Llama, Mistral, Qwen2, SmolLM): RMSNorm, RoPE, grouped-query attention,
//! SiLU-gated MLP. One forward advances a *ragged* batch: the new tokens of every sequence are packed into
//! one (T, hidden) matrix for the projections, which is where the work is, and attention runs per sequence
//! against that sequence's own KV cache.

use std::sync::Arc;

use candle_core::{DType, Device, Module, Tensor};

use crate::config::{LlamaConfig, RopeStyle};
use crate::gemm::PackedWeight;
use crate::kv::{KvPool, SeqKv};
use crate::profile::{self, Phase};
use crate::stacked::Stacked;

/// Which projection of a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProjKind {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl ProjKind {
    pub const ALL: [ProjKind; 7] = [
        Self::Q,
        Self::K,
        Self::V,
        Self::O,
        Self::Gate,
        Self::Up,
        Self::Down,
    ];
    pub const MLP: [ProjKind; 3] = [Self::Gate, Self::Up, Self::Down];
    pub const ATTN: [ProjKind; 4] = [Self::Q, Self::K, Self::V, Self::O];

    pub fn name(self) -> &'static str {
        match self {
            Self::Q => "q_proj",
            Self::K => "k_proj",
            Self::V => "v_proj",
            Self::O => "o_proj",
            Self::Gate => "gate_proj",
            Self::Up => "up_proj",
            Self::Down => "down_proj",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == s)
    }
}

/// A projection matrix of the model: layer and kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProjId {
    pub layer: usize,
    pub kind: ProjKind,
}

impl ProjId {
    /// Stable name used in decomposition caches and expert files, e.g. `layers.3.gate_proj`.
    pub fn name(&self) -> String {
        format!("layers.{}.{}", self.layer, self.kind.name())
    }

    pub fn parse(s: &str) -> Option<Self> {
        let rest = s.strip_prefix("layers.")?;
        let (layer, kind) = rest.split_once('.')?;
        Some(Self {
            layer: layer.parse().ok()?,
            kind: ProjKind::from_name(kind)?,
        })
    }
}

/// A dense projection y = x·Wᵀ (+ b), W of shape (out, in).
#[derive(Debug, Clone)]
pub struct Linear {
    pub id: ProjId,
    /// None once released ([`Linear::release_dense`]): a server on the CPU then holds W only as `packed`.
    weight: Option<Tensor>,
    dims: (usize, usize),
    pub bias: Option<Tensor>,
    /// W in the GEMM's layout, made once when the model is built ([`Llama`] fills it in; None where the
    /// packed kernel does not apply).
    pub packed: Option<Arc<PackedWeight>>,
}

impl Linear {
    /// `weight` (out, in); a weight of another rank is kept for the loader's shape check to name, with
    /// dims (0, 0).
    pub fn new(id: ProjId, weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            dims: weight.dims2().unwrap_or_default(),
            id,
            weight: Some(weight),
            bias,
            packed: None,
        }
    }

    /// W as a dense tensor: an error once released, since only the packed copy is left then.
    pub fn weight(&self) -> candle_core::Result<&Tensor> {
        self.weight.as_ref().ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "the dense copy of {} was released (this model holds its base weights only in the CPU's \
                 packed layout)",
                self.id.name()
            ))
        })
    }

    /// (out, in).
    pub fn dims(&self) -> (usize, usize) {
        self.dims
    }

    /// Replaces W by the same values held elsewhere (a view into a [`Stacked`] weight).
    pub(crate) fn set_weight(&mut self, weight: Tensor) {
        debug_assert_eq!(weight.dims2().ok(), Some(self.dims));
        self.weight = Some(weight);
    }

    /// Drops the dense copy where the packed one serves every product; returns the bytes freed.
    pub fn release_dense(&mut self) -> usize {
        match (&self.packed, &self.weight) {
            (Some(_), Some(w)) => {
                let bytes = w.elem_count() * w.dtype().size_in_bytes();
                self.weight = None;
                bytes
            }
            _ => 0,
        }
    }

    /// x·Wᵀ with the base weights (no bias).
    pub fn dense(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        crate::kernels::linear_packed(x, self.weight.as_ref(), self.packed.as_deref())
    }
}

/// How the base weights are held for the CPU's packed kernels: in the model's dtype, in half precision, or
/// as 8-bit integers with block scales. In the last three, activations, the KV cache and the SVF factors
/// stay in the model's dtype (f32 on CPU), as llama.cpp runs its F16 and quantized files: a decode step
/// streams half or a quarter of the bytes, and every f32 kernel still applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BaseWeights {
    #[default]
    Dense,
    F16,
    BF16,
    Q8,
}

/// The mix id of every packed row of a batch step. `uniform` is set when all rows share one mix, which lets
/// a projector use merged weights.
#[derive(Debug, Clone)]
pub struct RowMixes {
    pub ids: Vec<u32>,
    pub uniform: Option<u32>,
    /// `ids` on the model's device, built once per step for projectors that gather per-row scales.
    pub ids_tensor: Tensor,
}

impl RowMixes {
    pub fn new(ids: Vec<u32>, device: &Device) -> candle_core::Result<Self> {
        let ids_tensor = Tensor::from_slice(&ids, ids.len(), device)?;
        Ok(Self::with_tensor(ids, ids_tensor))
    }

    /// `ids` with their copy on the device already made (e.g. a view of a step's one upload).
    pub fn with_tensor(ids: Vec<u32>, ids_tensor: Tensor) -> Self {
        let uniform = match ids.first() {
            Some(&first) if ids.iter().all(|&m| m == first) => Some(first),
            _ => None,
        };
        Self {
            ids,
            uniform,
            ids_tensor,
        }
    }
}

/// How every projection's matrix product is carried out. The model knows nothing of experts: SVF plugs in
/// here to multiply each row with its own mix.
pub trait Projector: Send + Sync {
    /// Returns x·W'ᵀ (no bias) for x of shape (rows, in), where W' is `lin`'s weight as adapted for each row.
    fn project(&self, lin: &Linear, x: &Tensor, rows: &RowMixes) -> candle_core::Result<Tensor>;

    /// Whether every row multiplies `lin` by its base weights, so a [`Stacked`] weight may serve it.
    fn uses_base(&self, lin: &Linear, rows: &RowMixes) -> bool;
}

/// The unadapted model: every row uses the base weights.
pub struct DenseProjector;

impl Projector for DenseProjector {
    fn project(&self, lin: &Linear, x: &Tensor, _rows: &RowMixes) -> candle_core::Result<Tensor> {
        lin.dense(x)
    }

    fn uses_base(&self, _lin: &Linear, _rows: &RowMixes) -> bool {
        true
    }
}

pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f32,
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        candle_nn::ops::rms_norm(x, &self.weight, self.eps)
    }
}

pub struct Attention {
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    /// Qwen3: RMSNorm of each q and k head (weights of size head_dim), before RoPE.
    pub q_norm: Option<RmsNorm>,
    pub k_norm: Option<RmsNorm>,
    /// q, k and v stacked (on a GPU): one GEMM for rows on the base weights.
    pub qkv: Option<Stacked>,
}

impl Attention {
    /// The per-head q/k norms where the model has them (Qwen3); x is (rows, heads, head_dim).
    pub fn norm_heads(norm: &Option<RmsNorm>, x: Tensor) -> candle_core::Result<Tensor> {
        match norm {
            Some(n) => n.forward(&x.contiguous()?),
            None => Ok(x),
        }
    }
}

pub struct Mlp {
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
    /// gate and up stacked (on a GPU): one GEMM for rows on the base weights.
    pub gate_up: Option<Stacked>,
}

pub struct Block {
    pub attn_norm: RmsNorm,
    pub attn: Attention,
    pub mlp_norm: RmsNorm,
    pub mlp: Mlp,
}

impl Block {
    /// The block's seven projections, in the order of [`Llama::linears`].
    fn linears_mut(&mut self) -> [&mut Linear; 7] {
        let (a, m) = (&mut self.attn, &mut self.mlp);
        [
            &mut a.q,
            &mut a.k,
            &mut a.v,
            &mut a.o,
            &mut m.gate,
            &mut m.up,
            &mut m.down,
        ]
    }
}

/// Which logits a sequence wants back from a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WantLogits {
    None,
    /// The last new position: (vocab,).
    Last,
    /// Every new position: (t, vocab), for scoring continuations.
    All,
}

/// One sequence's part of a batch step: its KV blocks (advanced by the step), its new tokens and the mix
/// its rows use.
pub struct SeqStep<'a> {
    pub kv: &'a mut SeqKv,
    pub tokens: &'a [u32],
    pub mix: u32,
    pub want: WantLogits,
}

/// Where a step's K/V rows go in the pool and where each sequence's positions are, computed once per step
/// (the same for every layer).
struct KvRows {
    /// (first batch row, rows, first pool row of head 0) for each run of new positions within one block;
    /// head h's run starts h·BLOCK_SIZE rows further.
    writes: Vec<(usize, usize, usize)>,
    /// Per sequence: the pool rows of all its positions, the new ones included (built on first use:
    /// the decode kernel reads block tables directly).
    gathers: std::cell::OnceCell<Vec<Tensor>>,
    slots: Vec<Vec<u32>>,
    device: Device,
}

impl KvRows {
    fn new(
        steps: &[SeqStep<'_>],
        spans: &[(usize, usize, usize)],
        kv_heads: usize,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let mut writes = Vec::new();
        let mut slots = Vec::with_capacity(steps.len());
        for (s, &(off, t, start)) in steps.iter().zip(spans) {
            let mut p = start;
            while p < start + t {
                let run = (crate::kv::BLOCK_SIZE - p % crate::kv::BLOCK_SIZE).min(start + t - p);
                writes.push((off + p - start, run, s.kv.row(p, 0, kv_heads)));
                p += run;
            }
            slots.push(s.kv.rows(start + t, kv_heads));
        }
        Ok(Self {
            writes,
            gathers: std::cell::OnceCell::new(),
            slots,
            device: device.clone(),
        })
    }

    fn gathers(&self) -> candle_core::Result<&[Tensor]> {
        if self.gathers.get().is_none() {
            let g = self
                .slots
                .iter()
                .map(|ids| Tensor::from_slice(ids, ids.len(), &self.device))
                .collect::<candle_core::Result<Vec<_>>>()?;
            let _ = self.gathers.set(g);
        }
        Ok(self.gathers.get().expect("just set"))
    }
}

/// Each new row's RoPE cos and sin, (rows, 1, head_dim / 2), gathered from the model's tables on first use:
/// the fused GPU kernel reads the tables at each row's position itself, and two gathers a step are two
/// launches it does not need.
struct RopeRows<'a> {
    model: &'a Llama,
    pos: &'a Tensor,
    rows: std::cell::OnceCell<(Tensor, Tensor)>,
}

impl RopeRows<'_> {
    fn get(&self) -> candle_core::Result<(&Tensor, &Tensor)> {
        if self.rows.get().is_none() {
            let (n, half) = (self.pos.dim(0)?, self.model.cfg.head_dim / 2);
            let gather = |t: &Tensor| t.index_select(self.pos, 0)?.reshape((n, 1, half));
            let pair = (gather(&self.model.rope_cos)?, gather(&self.model.rope_sin)?);
            let _ = self.rows.set(pair);
        }
        let (cos, sin) = self.rows.get().expect("just set");
        Ok((cos, sin))
    }
}

/// How a step finds its KV rows: host-side row lists for the CPU kernels, or the step's upload for the
/// GPU kernels.
enum KvIndex {
    Host(KvRows),
    #[cfg(feature = "cuda")]
    Device(crate::cuda::AttentionRows),
}

pub struct Llama {
    pub cfg: LlamaConfig,
    pub embed: Tensor,
    pub blocks: Vec<Block>,
    pub norm: RmsNorm,
    pub lm_head: Tensor,
    lm_head_packed: Option<PackedWeight>,
    rope_cos: Tensor,
    rope_sin: Tensor,
    dtype: DType,
    device: Device,
}

/// The longest RoPE table built up front; longer contexts are capped here.
const MAX_ROPE_TABLE: usize = 131_072;

impl Llama {
    pub(crate) fn new(
        cfg: LlamaConfig,
        embed: Tensor,
        blocks: Vec<Block>,
        norm: RmsNorm,
        lm_head: Tensor,
    ) -> candle_core::Result<Self> {
        let device = embed.device().clone();
        let dtype = embed.dtype();
        let (rope_cos, rope_sin) = rope_tables(&cfg, dtype, &device)?;
        // Packed once here, never per call: the GEMM reads weights only in its own layout.
        let mut blocks = blocks;
        for b in &mut blocks {
            for lin in b.linears_mut() {
                if let (None, Some(w)) = (&lin.packed, &lin.weight) {
                    lin.packed = crate::kernels::pack(w).map(Arc::new);
                }
            }
        }
        let lm_head_packed = crate::kernels::pack(&lm_head);
        let mut model = Self {
            cfg,
            embed,
            blocks,
            norm,
            lm_head,
            lm_head_packed,
            rope_cos,
            rope_sin,
            dtype,
            device,
        };
        if crate::stacked::stacks_projections(&model.device) {
            model.stack_projections()?;
        }
        Ok(model)
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Holds the base weights as `format` says ([`BaseWeights::Dense`] leaves the model as it is). Only the
    /// packed copies the base rows read change: the dense weights stay for the SVF factors and merges,
    /// which is why rows with a mix are unaffected. An error on a device without the packed kernels.
    pub fn set_base_weights(&mut self, format: BaseWeights) -> candle_core::Result<()> {
        let half = match format {
            BaseWeights::Dense => return Ok(()),
            BaseWeights::F16 => Some(DType::F16),
            BaseWeights::BF16 => Some(DType::BF16),
            BaseWeights::Q8 => None,
        };
        let repack = |w: &Tensor| {
            let packed = match half {
                Some(dt) => crate::kernels::pack(&w.to_dtype(dt)?),
                None => crate::kernels::pack_q8(w),
            };
            packed.ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "{format:?} base weights need the model on the CPU"
                ))
            })
        };
        for b in &mut self.blocks {
            for lin in b.linears_mut() {
                lin.packed = Some(Arc::new(repack(lin.weight()?)?));
            }
        }
        self.lm_head_packed = Some(repack(&self.lm_head)?);
        Ok(())
    }

    /// Drops the dense copy of every projection that has a packed one ([`Linear::release_dense`]), so a
    /// server holds its base weights once; returns the bytes freed. What reads W densely afterwards
    /// (a new decomposition, training, export) gets an error, not other weights. The output head stays:
    /// it doubles as the token embedding when tied.
    pub fn release_dense(&mut self) -> usize {
        self.blocks
            .iter_mut()
            .flat_map(|b| b.linears_mut())
            .map(Linear::release_dense)
            .sum()
    }

    /// Whether the base rows run on 8-bit weights ([`Self::set_base_weights`] with [`BaseWeights::Q8`]).
    pub fn is_quantized(&self) -> bool {
        self.base_elem() == Some(crate::gemm::Elem::Q8)
    }

    /// The storage of the packed base weights the CPU kernels read (None: not packed).
    pub fn base_elem(&self) -> Option<crate::gemm::Elem> {
        self.lm_head_packed.as_ref().map(|p| p.elem())
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// KV storage for `num_blocks` blocks.
    pub fn new_pool(&self, num_blocks: usize) -> candle_core::Result<KvPool> {
        KvPool::new(&self.cfg, num_blocks, self.dtype, &self.device)
    }

    /// A pool just large enough for sequences of these lengths, and their blocks (see
    /// [`KvPool::for_sequences`]).
    pub fn pool_for(&self, lengths: &[usize]) -> candle_core::Result<(KvPool, Vec<SeqKv>)> {
        KvPool::for_sequences(&self.cfg, lengths, self.dtype, &self.device)
    }

    /// Every projection of the model, in layer order.
    pub fn linears(&self) -> impl Iterator<Item = &Linear> {
        self.blocks.iter().flat_map(|b| {
            [
                &b.attn.q,
                &b.attn.k,
                &b.attn.v,
                &b.attn.o,
                &b.mlp.gate,
                &b.mlp.up,
                &b.mlp.down,
            ]
        })
    }

    pub fn linear(&self, id: ProjId) -> Option<&Linear> {
        self.linears().find(|l| l.id == id)
    }

    /// Bytes of weights read per decoded token (every projection, norms, and the output head).
    pub fn weight_bytes(&self) -> usize {
        let elem = self.dtype.size_in_bytes();
        let lin: usize = self.linears().map(|l| l.dims.0 * l.dims.1).sum();
        (lin + self.lm_head.elem_count() + self.cfg.hidden_size * (2 * self.cfg.num_layers + 1))
            * elem
    }

    /// Bytes a decode step reads from the packed weights (their padding included, plus the norms), or
    /// None where some matrix has no packed copy. Divided by [`Self::weight_bytes`]: how much more than
    /// the weights themselves a step reads.
    pub fn packed_weight_bytes(&self) -> Option<usize> {
        let mut total = self.lm_head_packed.as_ref()?.bytes();
        for l in self.linears() {
            total += l.packed.as_ref()?.bytes();
        }
        Some(
            total
                + self.cfg.hidden_size * (2 * self.cfg.num_layers + 1) * self.dtype.size_in_bytes(),
        )
    }

    /// Advances every sequence of `steps` by its new tokens in one batched pass, writing their K/V into
    /// `pool` through each sequence's blocks. Returns, per step, the logits it asked for, in f32.
    pub fn forward(
        &self,
        steps: &mut [SeqStep<'_>],
        projector: &dyn Projector,
        pool: &KvPool,
    ) -> candle_core::Result<Vec<Option<Tensor>>> {
        let cfg = &self.cfg;
        let mut tokens = Vec::new();
        let mut positions = Vec::new();
        let mut row_mix = Vec::new();
        let mut spans = Vec::with_capacity(steps.len());
        for s in steps.iter_mut() {
            if s.tokens.is_empty() {
                candle_core::bail!("a sequence step needs at least one token");
            }
            if let Some(&bad) = s.tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
                candle_core::bail!(
                    "token id {bad} is outside the vocabulary of {}",
                    cfg.vocab_size
                );
            }
            let start = s.kv.len;
            let end = start + s.tokens.len();
            if end > cfg.max_position_embeddings {
                candle_core::bail!(
                    "sequence of {end} tokens exceeds the model's context of {} tokens",
                    cfg.max_position_embeddings
                );
            }
            if end > s.kv.capacity() {
                candle_core::bail!(
                    "the sequence's KV blocks hold {} positions, the step needs {end}",
                    s.kv.capacity()
                );
            }
            spans.push((tokens.len(), s.tokens.len(), start));
            tokens.extend_from_slice(s.tokens);
            positions.extend((start..start + s.tokens.len()).map(|p| p as u32));
            row_mix.extend(std::iter::repeat_n(s.mix, s.tokens.len()));
        }
        if tokens.is_empty() {
            return Ok(Vec::new());
        }
        let n = tokens.len();
        // Only the rows someone asked for go through the (large) output head.
        let mut wanted = Vec::new();
        for (s, &(off, t, _)) in steps.iter().zip(&spans) {
            match s.want {
                WantLogits::None => {}
                WantLogits::Last => wanted.push((off + t - 1) as u32),
                WantLogits::All => wanted.extend((off..off + t).map(|r| r as u32)),
            }
        }
        // Everything the step needs on the device goes up in one copy, then is read through views.
        let mut meta = Vec::with_capacity(4 * n + wanted.len());
        for part in [&tokens, &positions, &row_mix, &wanted] {
            meta.extend_from_slice(part);
        }
        #[cfg(feature = "cuda")]
        let gpu_rows = match self.device.is_cuda() {
            true => Some(crate::cuda::RowOffsets::append(
                steps,
                &spans,
                cfg.num_kv_heads,
                pool.num_blocks(),
                &mut meta,
            )?),
            false => None,
        };
        let len = meta.len();
        let meta = Tensor::from_vec(meta, len, &self.device)?;
        let token_ids = meta.narrow(0, 0, n)?;
        let pos_ids = meta.narrow(0, n, n)?;
        let rows = RowMixes::with_tensor(row_mix, meta.narrow(0, 2 * n, n)?);
        let wanted_ids = meta.narrow(0, 3 * n, wanted.len())?;
        let rope = RopeRows {
            model: self,
            pos: &pos_ids,
            rows: std::cell::OnceCell::new(),
        };

        #[cfg(feature = "cuda")]
        let kv_rows = match gpu_rows {
            Some(g) => KvIndex::Device(g.on(&meta)?),
            None => KvIndex::Host(KvRows::new(steps, &spans, cfg.num_kv_heads, &self.device)?),
        };
        #[cfg(not(feature = "cuda"))]
        let kv_rows = KvIndex::Host(KvRows::new(steps, &spans, cfg.num_kv_heads, &self.device)?);
        let mut x = self.embed.index_select(&token_ids, 0)?;
        let mut h = match self.blocks.first() {
            Some(b) => b.attn_norm.forward(&x)?,
            None => self.norm.forward(&x)?,
        };
        for (layer, block) in self.blocks.iter().enumerate() {
            let attn = self.attention(
                layer,
                &block.attn,
                &h,
                &rope,
                steps,
                &spans,
                (pool, &kv_rows),
                projector,
                &rows,
            )?;
            (x, h) = add_norm(&x, &attn, &block.mlp_norm)?;
            let mlp = self.mlp(&block.mlp, &h, projector, &rows)?;
            // The next layer's input norm, or after the last layer the output norm.
            let next = self
                .blocks
                .get(layer + 1)
                .map_or(&self.norm, |b| &b.attn_norm);
            (x, h) = add_norm(&x, &mlp, next)?;
        }
        drop(x);
        for s in steps.iter_mut() {
            s.kv.len += s.tokens.len();
        }

        if wanted.is_empty() {
            return Ok(steps.iter().map(|_| None).collect());
        }
        let picked = h.index_select(&wanted_ids, 0)?;
        let logits = {
            let _gemm = profile::span(Phase::Gemm);
            crate::kernels::linear_packed(
                &picked,
                Some(&self.lm_head),
                self.lm_head_packed.as_ref(),
            )?
            .to_dtype(DType::F32)?
        };
        let mut out = Vec::with_capacity(steps.len());
        let mut at = 0;
        for (s, &(_, t, _)) in steps.iter().zip(&spans) {
            out.push(match s.want {
                WantLogits::None => None,
                WantLogits::Last => {
                    at += 1;
                    Some(logits.get(at - 1)?)
                }
                WantLogits::All => {
                    at += t;
                    Some(logits.narrow(0, at - t, t)?)
                }
            });
        }
        Ok(out)
    }

    fn project(
        &self,
        lin: &Linear,
        x: &Tensor,
        p: &dyn Projector,
        rows: &RowMixes,
    ) -> candle_core::Result<Tensor> {
        let _gemm = profile::span(Phase::Gemm);
        let y = p.project(lin, x, rows)?;
        match &lin.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    fn rope(&self, x: &Tensor, rope: &RopeRows<'_>) -> candle_core::Result<Tensor> {
        let (cos, sin) = rope.get()?;
        // (rows, heads, head_dim) seen as (batch=rows, heads, seq=1, head_dim): every row has its own position.
        let (n, h, d) = x.dims3()?;
        let x = x.reshape((n, h, 1, d))?;
        let y = match self.cfg.rope_style {
            RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(&x, cos, sin)?,
            RopeStyle::Half => candle_nn::rotary_emb::rope(&x, cos, sin)?,
        };
        y.reshape((n, h, d))
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        layer: usize,
        attn: &Attention,
        h: &Tensor,
        rope: &RopeRows<'_>,
        steps: &[SeqStep<'_>],
        spans: &[(usize, usize, usize)],
        (pool, kv_index): (&KvPool, &KvIndex),
        p: &dyn Projector,
        rows: &RowMixes,
    ) -> candle_core::Result<Tensor> {
        // The projections inside count as GEMM (their spans are taken out of this one).
        let _attention = profile::span(Phase::Attention);
        let cfg = &self.cfg;
        let n = h.dim(0)?;
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let (q, k, v) = match Stacked::serving(&attn.qkv, &[&attn.q, &attn.k, &attn.v], p, rows) {
            // Views into one (rows, heads + 2·kv_heads, head_dim) output, each row strided.
            Some(s) => {
                let qkv = {
                    let _gemm = profile::span(Phase::Gemm);
                    s.forward(h)?.reshape((n, nh + 2 * nkv, hd))?
                };
                (
                    qkv.narrow(1, 0, nh)?,
                    qkv.narrow(1, nh, nkv)?,
                    qkv.narrow(1, nh + nkv, nkv)?,
                )
            }
            None => (
                self.project(&attn.q, h, p, rows)?.reshape((n, nh, hd))?,
                self.project(&attn.k, h, p, rows)?.reshape((n, nkv, hd))?,
                self.project(&attn.v, h, p, rows)?.reshape((n, nkv, hd))?,
            ),
        };
        let q = Attention::norm_heads(&attn.q_norm, q)?;
        let k = Attention::norm_heads(&attn.k_norm, k)?;
        // Every new position's K/V goes into its pool row first: attention then reads all positions,
        // the new ones included, from the pool.
        let (k_pool, v_pool) = (&pool.k[layer], &pool.v[layer]);
        // Without the cuda feature the match has one arm.
        #[allow(clippy::infallible_destructuring_match)]
        let kv_rows = match kv_index {
            KvIndex::Host(r) => r,
            #[cfg(feature = "cuda")]
            KvIndex::Device(a) => {
                let q = if crate::cuda::fused() {
                    let rows_of = crate::cuda::row_strided;
                    rows_of(&q)?.apply_op3_no_bwd(
                        &rows_of(&k)?,
                        &rows_of(&v)?,
                        &crate::cuda::RopeStore {
                            rows: a,
                            cos: &self.rope_cos,
                            sin: &self.rope_sin,
                            k_pool,
                            v_pool,
                            half_style: cfg.rope_style == RopeStyle::Half,
                        },
                    )?
                } else {
                    let k = self.rope(&k, rope)?;
                    k_pool.inplace_op3(&k.contiguous()?, &a.slots, &crate::cuda::KvWrite)?;
                    v_pool.inplace_op3(&v.contiguous()?, &a.slots, &crate::cuda::KvWrite)?;
                    self.rope(&q, rope)?.contiguous()?
                };
                let out = q.apply_op3_no_bwd(
                    k_pool,
                    v_pool,
                    &crate::cuda::PagedAttention {
                        rows: a,
                        kv_heads: nkv,
                    },
                )?;
                return self.project(&attn.o, &out.reshape((n, nh * hd))?, p, rows);
            }
        };
        let q = self.rope(&q, rope)?;
        let k = self.rope(&k, rope)?;
        if k_pool.device().is_cpu() {
            let (k, v) = (k.contiguous()?, v.contiguous()?);
            for (pool_t, src) in [(k_pool, &k), (v_pool, &v)] {
                pool_t.inplace_op1(&crate::kernels::KvWrite {
                    src,
                    writes: &kv_rows.writes,
                    kv_heads: pool.kv_heads,
                })?;
            }
        } else {
            // Head-major, like the pool: (kv_heads, rows, head_dim).
            let (kt, vt) = (
                k.transpose(0, 1)?.contiguous()?,
                v.transpose(0, 1)?.contiguous()?,
            );
            for &(off, len, row) in &kv_rows.writes {
                for h in 0..pool.kv_heads {
                    let at = row + h * crate::kv::BLOCK_SIZE;
                    k_pool.slice_set(&kt.get(h)?.narrow(0, off, len)?, 0, at)?;
                    v_pool.slice_set(&vt.get(h)?.narrow(0, off, len)?, 0, at)?;
                }
            }
        }
        let q = q.contiguous()?;
        // Every new row attends over its own prefix, one (row, head) pair per task: decode rows and short
        // prompt chunks in one pass. Long chunks are cheaper as the per-sequence matrix products below.
        if steps
            .iter()
            .all(|s| s.tokens.len() <= ROW_ATTENTION_MAX_TOKENS)
        {
            let seqs: Vec<_> = steps
                .iter()
                .zip(spans)
                .flat_map(|(s, &(_, t, start))| {
                    (0..t).map(move |j| crate::cpu_attention::BlockKv {
                        blocks: &s.kv.blocks,
                        len: start + j + 1,
                    })
                })
                .collect();
            let out =
                crate::cpu_attention::attention_rows(&q, k_pool, v_pool, &seqs, cfg.group_size())?;
            if let Some(out) = out {
                return self.project(&attn.o, &out, p, rows);
            }
        }
        let mut outs = Vec::with_capacity(steps.len());
        for (ids, &(off, t, start)) in kv_rows.gathers()?.iter().zip(spans) {
            let qs = q.narrow(0, off, t)?.transpose(0, 1)?.contiguous()?;
            let gather = |pool: &Tensor| -> candle_core::Result<Tensor> {
                pool.index_select(ids, 0)?.reshape((nkv, start + t, hd))
            };
            outs.push(self.attend(&qs, &gather(k_pool)?, &gather(v_pool)?, start)?);
        }
        let out = if outs.len() == 1 {
            outs.pop().unwrap()
        } else {
            Tensor::cat(&outs, 0)?
        };
        self.project(&attn.o, &out, p, rows)
    }

    /// Causal attention of one sequence's new queries (heads, t, d) over its cache (kv_heads, start + t, d).
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        start: usize,
    ) -> candle_core::Result<Tensor> {
        let cfg = &self.cfg;
        let (nh, t, hd) = q.dims3()?;
        let (nkv, g) = (cfg.num_kv_heads, cfg.group_size());
        let total = start + t;
        // Query heads that share a KV head are stacked as extra rows so K and V are never copied per head.
        let q = q.reshape((nkv, g * t, hd))?;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut scores = (q.matmul(&k.t()?)? * scale)?.to_dtype(DType::F32)?;
        if t > 1 {
            let mask: Vec<f32> = (0..t)
                .flat_map(|i| {
                    (0..total).map(move |j| {
                        if j > start + i {
                            f32::NEG_INFINITY
                        } else {
                            0.0
                        }
                    })
                })
                .collect();
            let mask = Tensor::from_vec(mask, (t, total), &self.device)?;
            scores = scores
                .reshape((nkv, g, t, total))?
                .broadcast_add(&mask)?
                .reshape((nkv, g * t, total))?;
        }
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(self.dtype)?;
        let out = probs.matmul(&v.contiguous()?)?; // (nkv, g*t, hd)
        out.reshape((nh, t, hd))?
            .transpose(0, 1)?
            .reshape((t, nh * hd))
    }

    fn mlp(
        &self,
        mlp: &Mlp,
        h: &Tensor,
        p: &dyn Projector,
        rows: &RowMixes,
    ) -> candle_core::Result<Tensor> {
        let (gate, up) = match Stacked::serving(&mlp.gate_up, &[&mlp.gate, &mlp.up], p, rows) {
            Some(s) => {
                let width = mlp.gate.dims().0;
                let gate_up = {
                    let _gemm = profile::span(Phase::Gemm);
                    s.forward(h)?
                };
                (
                    gate_up.narrow(1, 0, width)?,
                    gate_up.narrow(1, width, width)?,
                )
            }
            None => (
                self.project(&mlp.gate, h, p, rows)?,
                self.project(&mlp.up, h, p, rows)?,
            ),
        };
        #[cfg(feature = "cuda")]
        if gate.device().is_cuda() && crate::cuda::fused() {
            return self.project(&mlp.down, &crate::cuda::silu_mul(&gate, &up)?, p, rows);
        }
        if let Some(act) = crate::kernels::silu_mul(&gate, &up)? {
            return self.project(&mlp.down, &act, p, rows);
        }
        self.project(&mlp.down, &(candle_nn::ops::silu(&gate)? * up)?, p, rows)
    }
}

/// A sequence's new tokens up to which attention runs row by row (see `Llama::attention`).
const ROW_ATTENTION_MAX_TOKENS: usize = 128;

/// (x + r, norm(x + r)): the residual stream and the next sublayer's input, in one pass (one launch on a
/// GPU, one allocation on the CPU).
fn add_norm(x: &Tensor, r: &Tensor, norm: &RmsNorm) -> candle_core::Result<(Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() && crate::cuda::fused() {
        return crate::cuda::add_rms_norm(x, r, &norm.weight, norm.eps);
    }
    if let Some(pair) = crate::kernels::add_rms_norm(x, r, &norm.weight, norm.eps)? {
        return Ok(pair);
    }
    let x = (x + r)?;
    let h = norm.forward(&x)?;
    Ok((x, h))
}

pub fn rope_tables(
    cfg: &LlamaConfig,
    dtype: DType,
    device: &Device,
) -> candle_core::Result<(Tensor, Tensor)> {
    let half = cfg.head_dim / 2;
    let len = cfg.max_position_embeddings.min(MAX_ROPE_TABLE);
    let mut inv_freq: Vec<f32> = (0..half)
        .map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f32 / cfg.head_dim as f32))
        .collect();
    cfg.rope_scaling.apply(&mut inv_freq);
    let inv_freq = Tensor::from_vec(inv_freq, (1, half), device)?;
    let pos = Tensor::arange(0u32, len as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((len, 1))?;
    let freqs = pos.broadcast_mul(&inv_freq)?;
    Ok((freqs.cos()?.to_dtype(dtype)?, freqs.sin()?.to_dtype(dtype)?))
}

/// Matrices larger than this many values are drawn on the device by [`random_llama`] (not the CPU).
const DEVICE_DRAW_ABOVE: usize = 1 << 22;

/// Random weights of a given shape, for tests of the machinery and speed work at sizes we cannot ship.
pub fn random_llama(
    cfg: &LlamaConfig,
    dtype: DType,
    device: &Device,
    seed: u64,
) -> candle_core::Result<Llama> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // Drawn on the host from the seed, so the same model comes out on every device (the GPU selftest
    // compares devices). At real sizes (billions of values) a host draw takes minutes of one core: large
    // matrices for an accelerator are drawn there instead, which only speed measurements use.
    let mut rand_t = |shape: (usize, usize), std: f32| -> candle_core::Result<Tensor> {
        let bound = (std * 1.732) as f64;
        if !device.is_cpu() && shape.0 * shape.1 > DEVICE_DRAW_ABOVE {
            return Tensor::rand(-bound as f32, bound as f32, shape, device)?.to_dtype(dtype);
        }
        let data: Vec<f32> = (0..shape.0 * shape.1)
            .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * std * 1.732)
            .collect();
        Tensor::from_vec(data, shape, device)?.to_dtype(dtype)
    };
    let (hs, is) = (cfg.hidden_size, cfg.intermediate_size);
    let (qd, kvd) = (
        cfg.num_heads * cfg.head_dim,
        cfg.num_kv_heads * cfg.head_dim,
    );
    let std_in = 1.0 / (hs as f32).sqrt();
    let mut blocks = Vec::with_capacity(cfg.num_layers);
    let ones = Tensor::ones(hs, dtype, device)?;
    let head_norm = || -> candle_core::Result<Option<RmsNorm>> {
        Ok(match cfg.qk_norm {
            true => Some(RmsNorm {
                weight: Tensor::ones(cfg.head_dim, dtype, device)?,
                eps: cfg.rms_norm_eps as f32,
            }),
            false => None,
        })
    };
    for layer in 0..cfg.num_layers {
        let mut lin = |kind, shape: (usize, usize), std| -> candle_core::Result<Linear> {
            let weight = rand_t(shape, std)?;
            let bias = match cfg.qkv_bias && matches!(kind, ProjKind::Q | ProjKind::K | ProjKind::V)
            {
                true => Some(rand_t((1, shape.0), 0.5)?.squeeze(0)?),
                false => None,
            };
            Ok(Linear::new(ProjId { layer, kind }, weight, bias))
        };
        blocks.push(Block {
            attn_norm: RmsNorm {
                weight: ones.clone(),
                eps: cfg.rms_norm_eps as f32,
            },
            attn: Attention {
                q: lin(ProjKind::Q, (qd, hs), std_in)?,
                k: lin(ProjKind::K, (kvd, hs), std_in)?,
                v: lin(ProjKind::V, (kvd, hs), std_in)?,
                o: lin(ProjKind::O, (hs, qd), 1.0 / (qd as f32).sqrt())?,
                q_norm: head_norm()?,
                k_norm: head_norm()?,
                qkv: None,
            },
            mlp_norm: RmsNorm {
                weight: ones.clone(),
                eps: cfg.rms_norm_eps as f32,
            },
            mlp: Mlp {
                gate: lin(ProjKind::Gate, (is, hs), std_in)?,
                up: lin(ProjKind::Up, (is, hs), std_in)?,
                down: lin(ProjKind::Down, (hs, is), 1.0 / (is as f32).sqrt())?,
                gate_up: None,
            },
        });
    }
    let embed = rand_t((cfg.vocab_size, hs), 1.0)?;
    let lm_head = if cfg.tie_word_embeddings {
        embed.clone()
    } else {
        rand_t((cfg.vocab_size, hs), std_in)?
    };
    Llama::new(
        cfg.clone(),
        embed,
        blocks,
        RmsNorm {
            weight: ones,
            eps: cfg.rms_norm_eps as f32,
        },
        lm_head,
    )
}
