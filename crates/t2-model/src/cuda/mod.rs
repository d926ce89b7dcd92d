//! The model's own CUDA kernels (src/cuda/kernels.cu, built to PTX by build.rs): writing new K/V rows
//! through block tables, and attention of a ragged batch over the paged cache, one launch each per layer.
//! candle's fused ops (rms_norm, rope, softmax) and cuBLAS cover the rest.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CpuStorage, CudaStorage, DType, Layout, Result, Shape, Storage, Tensor};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/kernels.ptx"));
const MODULE: &str = "t2_kernels";

fn suffix(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        other => candle_core::bail!("t2's CUDA kernels take f32, bf16 or f16, not {other:?}"),
    })
}

fn start(l: &Layout, what: &str) -> Result<usize> {
    match l.contiguous_offsets() {
        Some((a, _)) => Ok(a),
        None => candle_core::bail!("{what} must be contiguous"),
    }
}

/// Runs `$body` with `$T` bound to the element type of `$dtype`.
macro_rules! with_dtype {
    ($dtype:expr, $T:ident, $body:block) => {
        match $dtype {
            DType::F32 => {
                type $T = f32;
                $body
            }
            DType::BF16 => {
                type $T = half::bf16;
                $body
            }
            DType::F16 => {
                type $T = half::f16;
                $body
            }
            other => candle_core::bail!("t2's CUDA kernels take f32, bf16 or f16, not {other:?}"),
        }
    };
}

/// Writes `src` (rows, kv_heads, head_dim) into `pool` (one layer's K or V) at the pool rows in `slots`
/// (per row, the row of kv head 0; see kv.rs for the layout). Applied as `pool.inplace_op3(src, slots)`.
pub struct KvWrite;

impl candle_core::InplaceOp3 for KvWrite {
    fn name(&self) -> &'static str {
        "t2-kv-write"
    }

    fn cpu_fwd(
        &self,
        _: &mut CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<()> {
        candle_core::bail!("t2-kv-write runs on CUDA; the CPU path writes with kernels::KvWrite")
    }

    fn cuda_fwd(
        &self,
        pool: &mut CudaStorage,
        pl: &Layout,
        src: &CudaStorage,
        sl: &Layout,
        slots: &CudaStorage,
        ol: &Layout,
    ) -> Result<()> {
        let (rows, kv_heads, head_dim) = sl.shape().dims3()?;
        if pl.shape().dims2()?.1 != head_dim || ol.shape().elem_count() != rows {
            candle_core::bail!("t2-kv-write: rows, slots and pool do not match");
        }
        if rows == 0 {
            return Ok(());
        }
        let dev = src.device().clone();
        let func = dev.get_or_load_custom_func(
            &format!("kv_write_{}", suffix(src.dtype())?),
            MODULE,
            PTX,
        )?;
        let slots = slots.as_cuda_slice::<u32>()?.slice(start(ol, "slots")?..);
        let (s0, p0) = (start(sl, "K/V rows")?, start(pl, "the pool")?);
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, kv_heads as u32, 1),
            block_dim: (head_dim.min(128) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let (kvh, hd) = (kv_heads as i32, head_dim as i32);
        with_dtype!(src.dtype(), T, {
            let src = src.as_cuda_slice::<T>()?.slice(s0..);
            let mut pool = pool.as_cuda_slice_mut::<T>()?.slice_mut(p0..);
            let mut b = func.builder();
            b.arg(&src).arg(&mut pool).arg(&slots).arg(&kvh).arg(&hd);
            // SAFETY: the kernel reads rows·kv_heads·head_dim elements of src and writes pool rows the
            // block manager handed out (checked against the pool's size when the plan was built).
            unsafe { b.launch(cfg) }.w()?;
        });
        Ok(())
    }
}

/// Where each query row of a step reads its keys and writes its K/V: offsets (in elements) into the step's
/// one u32 upload, which holds every row's sequence and position, every sequence's offset into the block
/// tables, the tables themselves, and (as a view) every row's KV slot.
#[derive(Debug, Clone)]
pub struct AttentionRows {
    meta: Tensor,
    row_seq: usize,
    row_pos: usize,
    table_off: usize,
    tables: usize,
    pub slots: Tensor,
}

/// Causal attention of the step's queries `q` (rows, heads, head_dim) over one layer's paged K/V pool;
/// returns (rows, heads, head_dim). Applied as `q.apply_op3_no_bwd(k_pool, v_pool, op)`.
pub struct PagedAttention<'a> {
    pub rows: &'a AttentionRows,
    pub kv_heads: usize,
}

impl candle_core::CustomOp3 for PagedAttention<'_> {
    fn name(&self) -> &'static str {
        "t2-paged-attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("t2-paged-attention runs on CUDA; the CPU path has its own kernels")
    }

    fn cuda_fwd(
        &self,
        q: &CudaStorage,
        ql: &Layout,
        k: &CudaStorage,
        kl: &Layout,
        v: &CudaStorage,
        vl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (rows, heads, head_dim) = ql.shape().dims3()?;
        if head_dim > 256 || !heads.is_multiple_of(self.kv_heads) {
            candle_core::bail!(
                "t2-paged-attention: head_dim {head_dim} > 256 or heads not grouped"
            );
        }
        let dev = q.device().clone();
        let func = dev.get_or_load_custom_func(
            &format!("paged_attention_{}", suffix(q.dtype())?),
            MODULE,
            PTX,
        )?;
        let (meta, ml) = self.rows.meta.storage_and_layout();
        let Storage::Cuda(meta) = &*meta else {
            candle_core::bail!("t2-paged-attention: the step's metadata is not on the GPU");
        };
        let m0 = start(ml, "the step's metadata")?;
        let meta = meta.as_cuda_slice::<u32>()?;
        let at = |o: usize| meta.slice(m0 + o..);
        let (row_seq, row_pos, table_off, tables) = (
            at(self.rows.row_seq),
            at(self.rows.row_pos),
            at(self.rows.table_off),
            at(self.rows.tables),
        );
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, heads as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let (h, kvh, hd) = (heads as i32, self.kv_heads as i32, head_dim as i32);
        let scale = 1f32 / (head_dim as f32).sqrt();
        let (q0, k0, v0) = (
            start(ql, "q")?,
            start(kl, "the K pool")?,
            start(vl, "the V pool")?,
        );
        let out = with_dtype!(q.dtype(), T, {
            let qs = q.as_cuda_slice::<T>()?.slice(q0..);
            let ks = k.as_cuda_slice::<T>()?.slice(k0..);
            let vs = v.as_cuda_slice::<T>()?.slice(v0..);
            // SAFETY: every element is written by the kernel before it is read.
            let out = unsafe { dev.alloc::<T>(rows * heads * head_dim)? };
            let mut b = func.builder();
            b.arg(&qs).arg(&ks).arg(&vs).arg(&out);
            b.arg(&row_seq).arg(&row_pos).arg(&table_off).arg(&tables);
            b.arg(&h).arg(&kvh).arg(&hd).arg(&scale);
            // SAFETY: block tables and positions were checked against the pool when the step was built.
            unsafe { b.launch(cfg) }.w()?;
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        });
        Ok((out, ql.shape().clone()))
    }
}

/// Offsets into a step's upload of the rows [`PagedAttention`] and [`KvWrite`] read.
#[derive(Debug, Clone, Copy)]
pub struct RowOffsets {
    row_seq: usize,
    row_pos: usize,
    table_off: usize,
    tables: usize,
    slots: usize,
    rows: usize,
}

impl RowOffsets {
    /// Appends to `meta` every new row's sequence, position and KV slot, and each sequence's block table.
    /// `spans`: per sequence (first batch row, new rows, first new position). Fails on a block outside a
    /// pool of `pool_blocks` blocks: on the GPU such a write would corrupt memory silently.
    pub fn append(
        steps: &[crate::llama::SeqStep<'_>],
        spans: &[(usize, usize, usize)],
        kv_heads: usize,
        pool_blocks: usize,
        meta: &mut Vec<u32>,
    ) -> Result<Self> {
        let rows: usize = spans.iter().map(|s| s.1).sum();
        let base = meta.len();
        let o = Self {
            row_seq: base,
            row_pos: base + rows,
            slots: base + 2 * rows,
            table_off: base + 3 * rows,
            tables: base + 3 * rows + steps.len(),
            rows,
        };
        for (i, &(_, t, _)) in spans.iter().enumerate() {
            meta.extend(std::iter::repeat_n(i as u32, t));
        }
        for &(_, t, p) in spans {
            meta.extend((p..p + t).map(|p| p as u32));
        }
        for (s, &(_, t, p)) in steps.iter().zip(spans) {
            if let Some(&b) = s.kv.blocks.iter().find(|&&b| b as usize >= pool_blocks) {
                candle_core::bail!("KV block {b} is outside the pool of {pool_blocks} blocks");
            }
            meta.extend((p..p + t).map(|p| s.kv.row(p, 0, kv_heads) as u32));
        }
        let mut at = 0u32;
        for s in steps {
            meta.push(at);
            at += s.kv.blocks.len() as u32;
        }
        for s in steps {
            meta.extend_from_slice(&s.kv.blocks);
        }
        Ok(o)
    }

    /// The offsets read from `meta`, the step's upload.
    pub fn on(self, meta: &Tensor) -> Result<AttentionRows> {
        Ok(AttentionRows {
            meta: meta.clone(),
            row_seq: self.row_seq,
            row_pos: self.row_pos,
            table_off: self.table_off,
            tables: self.tables,
            slots: meta.narrow(0, self.slots, self.rows)?,
        })
    }
}
