//! Per-sequence key/value cache: one preallocated buffer per layer, grown by doubling, written in place.

use candle_core::{DType, Device, Tensor};

use crate::config::LlamaConfig;

pub struct KvCache {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    len: usize,
    cap: usize,
    num_kv_heads: usize,
    head_dim: usize,
    max_len: usize,
    dtype: DType,
    device: Device,
}

impl KvCache {
    pub fn new(cfg: &LlamaConfig, dtype: DType, device: &Device) -> Self {
        Self {
            k: Vec::new(),
            v: Vec::new(),
            len: 0,
            cap: 0,
            num_kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
            max_len: cfg.max_position_embeddings,
            dtype,
            device: device.clone(),
        }
        .with_layers(cfg.num_layers)
    }

    fn with_layers(mut self, n: usize) -> Self {
        self.k = Vec::with_capacity(n);
        self.v = Vec::with_capacity(n);
        self.k.resize(
            n,
            Tensor::zeros(0, self.dtype, &self.device).expect("empty tensor"),
        );
        self.v.resize(
            n,
            Tensor::zeros(0, self.dtype, &self.device).expect("empty tensor"),
        );
        self
    }

    /// Tokens already in the cache (= the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes held by the buffers (capacity, not length).
    pub fn bytes(&self) -> usize {
        2 * self.k.len() * self.num_kv_heads * self.cap * self.head_dim * self.dtype.size_in_bytes()
    }

    /// Bytes one cached token takes across all layers (for KV budgets).
    pub fn bytes_per_token(cfg: &LlamaConfig, dtype: DType) -> usize {
        2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * dtype.size_in_bytes()
    }

    /// Forgets everything after `len` tokens (e.g. to re-run from a shared prefix).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// An independent copy of the first `len` tokens with room for `extra` more: a sequence starting from
    /// a shared prefix (the buffers are written in place, so sharing them would alias).
    pub fn fork(&self, len: usize, extra: usize) -> candle_core::Result<Self> {
        let len = len.min(self.len);
        let mut out = Self {
            k: Vec::new(),
            v: Vec::new(),
            len: 0,
            cap: 0,
            num_kv_heads: self.num_kv_heads,
            head_dim: self.head_dim,
            max_len: self.max_len,
            dtype: self.dtype,
            device: self.device.clone(),
        }
        .with_layers(self.k.len());
        out.reserve(len + extra)?;
        if len > 0 {
            for (dst, src) in out.k.iter().zip(&self.k).chain(out.v.iter().zip(&self.v)) {
                dst.slice_set(&src.narrow(1, 0, len)?.contiguous()?, 1, 0)?;
            }
        }
        out.len = len;
        Ok(out)
    }

    /// Makes room for `extra` more tokens in every layer.
    pub fn reserve(&mut self, extra: usize) -> candle_core::Result<()> {
        let need = self.len + extra;
        if need > self.max_len {
            candle_core::bail!(
                "sequence of {need} tokens exceeds the model's context of {} tokens",
                self.max_len
            );
        }
        if need <= self.cap {
            return Ok(());
        }
        let new_cap = need
            .max(self.cap * 2)
            .max(64)
            .next_multiple_of(64)
            .min(self.max_len);
        for buf in self.k.iter_mut().chain(self.v.iter_mut()) {
            let grown = Tensor::zeros(
                (self.num_kv_heads, new_cap, self.head_dim),
                self.dtype,
                &self.device,
            )?;
            if self.len > 0 {
                grown.slice_set(&buf.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
            }
            *buf = grown;
        }
        self.cap = new_cap;
        Ok(())
    }

    /// Writes `k`, `v` of shape (kv_heads, t, head_dim) at the current end of `layer` and returns views of
    /// everything cached for that layer, the new tokens included. The length advances in [`Self::advance`].
    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let t = k.dim(1)?;
        self.k[layer].slice_set(k, 1, self.len)?;
        self.v[layer].slice_set(v, 1, self.len)?;
        Ok((
            self.k[layer].narrow(1, 0, self.len + t)?,
            self.v[layer].narrow(1, 0, self.len + t)?,
        ))
    }

    /// The whole (kv_heads, capacity, head_dim) buffers of one layer, for kernels that read them in place.
    pub(crate) fn buffers(&self, layer: usize) -> (&Tensor, &Tensor, usize) {
        (&self.k[layer], &self.v[layer], self.cap)
    }

    pub(crate) fn advance(&mut self, t: usize) {
        self.len += t;
    }
}
