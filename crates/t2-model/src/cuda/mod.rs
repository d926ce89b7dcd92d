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

fn rows_start(l: &Layout, what: &str) -> Result<(usize, usize)> {
    match crate::stacked::rows_layout(l) {
        Some(r) => Ok(r),
        None => candle_core::bail!("{what}: each row must be contiguous"),
    }
}

/// `t` itself where the kernels can read it row by row (each row contiguous, rows at any stride), else a
/// contiguous copy: the parts of a stacked projection's output go in without a copy.
pub fn row_strided(t: &Tensor) -> Result<Tensor> {
    match crate::stacked::rows_layout(t.layout()) {
        Some(_) => Ok(t.clone()),
        None => t.contiguous(),
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

/// `name` and a `cpu_fwd` that refuses, for three-input ops that exist only on CUDA (the CPU path has its
/// own code for the same step).
macro_rules! cuda_only_op3 {
    ($name:literal) => {
        fn name(&self) -> &'static str {
            $name
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
            candle_core::bail!(concat!($name, " runs on CUDA only"))
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
    slots_at: usize,
    pub slots: Tensor,
}

/// Causal attention of the step's queries `q` (rows, heads, head_dim) over one layer's paged K/V pool;
/// returns (rows, heads, head_dim). Applied as `q.apply_op3_no_bwd(k_pool, v_pool, op)`.
pub struct PagedAttention<'a> {
    pub rows: &'a AttentionRows,
    pub kv_heads: usize,
}

impl candle_core::CustomOp3 for PagedAttention<'_> {
    cuda_only_op3!("t2-paged-attention");

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
            slots_at: self.slots,
            slots: meta.narrow(0, self.slots, self.rows)?,
        })
    }
}

/// Whether the fused kernels (residual add + RMSNorm, SiLU·up, RoPE + KV store) run; `T2_CUDA_UNFUSED=1`
/// turns them off, leaving candle's separate ops, to tell a fused kernel's fault from the rest.
pub fn fused() -> bool {
    static FUSED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FUSED.get_or_init(|| !env_set("T2_CUDA_UNFUSED"))
}

/// Whether models on the GPU stack q/k/v and gate/up ([`crate::stacked`]): with the fused kernels, unless
/// `T2_CUDA_UNSTACKED=1`, which keeps the fused kernels but runs each projection on its own.
pub fn stacking() -> bool {
    static STACKING: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *STACKING.get_or_init(|| fused() && !env_set("T2_CUDA_UNSTACKED"))
}

fn env_set(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v == "1")
}

fn launch_cfg(grid: (u32, u32), block: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid.0, grid.1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

struct AddRmsNorm {
    eps: f32,
}

impl candle_core::CustomOp3 for AddRmsNorm {
    cuda_only_op3!("t2-add-rms-norm");

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        r: &CudaStorage,
        rl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (rows, d) = xl.shape().dims2()?;
        if rl.shape().dims2()? != (rows, d) || wl.shape().elem_count() != d {
            candle_core::bail!("t2-add-rms-norm: shapes differ");
        }
        let dev = x.device().clone();
        let func = dev.get_or_load_custom_func(
            &format!("add_rms_norm_{}", suffix(x.dtype())?),
            MODULE,
            PTX,
        )?;
        let (x0, r0, w0) = (
            start(xl, "x")?,
            start(rl, "the residual")?,
            start(wl, "the norm")?,
        );
        let (n, dd, eps) = (rows as i32, d as i32, self.eps);
        let out = with_dtype!(x.dtype(), T, {
            let (xs, rs, ws) = (
                x.as_cuda_slice::<T>()?.slice(x0..),
                r.as_cuda_slice::<T>()?.slice(r0..),
                w.as_cuda_slice::<T>()?.slice(w0..),
            );
            // SAFETY: the kernel writes all 2·rows·d elements.
            let out = unsafe { dev.alloc::<T>(2 * rows * d)? };
            let mut b = func.builder();
            b.arg(&xs)
                .arg(&rs)
                .arg(&ws)
                .arg(&out)
                .arg(&n)
                .arg(&dd)
                .arg(&eps);
            // SAFETY: reads rows·d of x and r and d of w, all checked above.
            unsafe { b.launch(launch_cfg((rows as u32, 1), 256)) }.w()?;
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        });
        Ok((out, Shape::from((2, rows, d))))
    }
}

/// (x + r, rmsnorm(x + r)·w) in one launch.
pub fn add_rms_norm(x: &Tensor, r: &Tensor, w: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
    let out = x
        .contiguous()?
        .apply_op3_no_bwd(&r.contiguous()?, w, &AddRmsNorm { eps })?;
    Ok((out.get(0)?, out.get(1)?))
}

struct SiluMul;

impl candle_core::CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "t2-silu-mul"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("t2-silu-mul runs on CUDA")
    }

    fn cuda_fwd(
        &self,
        g: &CudaStorage,
        gl: &Layout,
        u: &CudaStorage,
        ul: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (rows, cols) = gl.shape().dims2()?;
        if ul.shape() != gl.shape() {
            candle_core::bail!("t2-silu-mul: shapes differ");
        }
        let n = rows * cols;
        let dev = g.device().clone();
        let func =
            dev.get_or_load_custom_func(&format!("silu_mul_{}", suffix(g.dtype())?), MODULE, PTX)?;
        let ((g0, g_stride), (u0, u_stride)) = (rows_start(gl, "gate")?, rows_start(ul, "up")?);
        let blocks = n.div_ceil(256).min(65_535) as u32;
        let out = with_dtype!(g.dtype(), T, {
            let (gs, us) = (
                g.as_cuda_slice::<T>()?.slice(g0..),
                u.as_cuda_slice::<T>()?.slice(u0..),
            );
            // SAFETY: the kernel writes all rows·cols elements.
            let out = unsafe { dev.alloc::<T>(n)? };
            let mut b = func.builder();
            b.arg(&gs).arg(&us).arg(&out);
            b.arg(&rows).arg(&cols).arg(&g_stride).arg(&u_stride);
            // SAFETY: cols elements of each row of each input, at the strides their layouts give.
            unsafe { b.launch(launch_cfg((blocks, 1), 256)) }.w()?;
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        });
        Ok((out, gl.shape().clone()))
    }
}

/// silu(g)·u in one launch, for g and u (rows, cols): read in place where each row is contiguous (the
/// halves of a stacked gate/up output).
pub fn silu_mul(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    row_strided(g)?.apply_op2_no_bwd(&row_strided(u)?, &SiluMul)
}

/// x (rows, cols) times each row's scales, `table` (capacity, cols) at the row's id: applied as
/// `x.apply_op3_no_bwd(table, ids, &ScaleRows)`; ids are u32 and every one below the capacity (the caller
/// checks).
struct ScaleRows;

impl candle_core::CustomOp3 for ScaleRows {
    cuda_only_op3!("t2-scale-rows");

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        table: &CudaStorage,
        tl: &Layout,
        ids: &CudaStorage,
        il: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (rows, cols) = xl.shape().dims2()?;
        if tl.shape().dims2()?.1 != cols || il.shape().elem_count() != rows {
            candle_core::bail!("t2-scale-rows: shapes differ");
        }
        let dev = x.device().clone();
        let func = dev.get_or_load_custom_func(
            &format!("scale_rows_{}", suffix(x.dtype())?),
            MODULE,
            PTX,
        )?;
        let (x0, t0, i0) = (
            start(xl, "x")?,
            start(tl, "the mix table")?,
            start(il, "the row ids")?,
        );
        let n = rows * cols;
        let blocks = n.div_ceil(256).clamp(1, 65_535) as u32;
        let ids = ids.as_cuda_slice::<u32>()?.slice(i0..);
        let out = with_dtype!(x.dtype(), T, {
            let (xs, ts) = (
                x.as_cuda_slice::<T>()?.slice(x0..),
                table.as_cuda_slice::<T>()?.slice(t0..),
            );
            // SAFETY: the kernel writes all rows·cols elements.
            let out = unsafe { dev.alloc::<T>(n)? };
            let mut b = func.builder();
            b.arg(&xs)
                .arg(&ts)
                .arg(&ids)
                .arg(&out)
                .arg(&rows)
                .arg(&cols);
            // SAFETY: rows·cols of x; table rows at ids the caller checked against the capacity.
            unsafe { b.launch(launch_cfg((blocks, 1), 256)) }.w()?;
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        });
        Ok((out, xl.shape().clone()))
    }
}

/// x·table[ids] in one launch (instead of a gather and a multiply); see [`crate::kernels::scale_rows`].
pub fn scale_rows(x: &Tensor, table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    x.contiguous()?
        .apply_op3_no_bwd(&table.contiguous()?, &ids.contiguous()?, &ScaleRows)
}

/// RoPE on q and k at each row's position (from the step's upload), k and v stored into their pool rows,
/// q returned rotated: applied as `q.apply_op3_no_bwd(k, v, op)`.
pub struct RopeStore<'a> {
    pub rows: &'a AttentionRows,
    pub cos: &'a Tensor,
    pub sin: &'a Tensor,
    pub k_pool: &'a Tensor,
    pub v_pool: &'a Tensor,
    /// Pairs (i, i + d/2) (HF checkpoints) rather than (2i, 2i + 1) (GGUF).
    pub half_style: bool,
}

impl candle_core::CustomOp3 for RopeStore<'_> {
    cuda_only_op3!("t2-rope-store");

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
        let (kr, kv_heads, kd) = kl.shape().dims3()?;
        if kr != rows
            || kd != head_dim
            || vl.shape() != kl.shape()
            || self.cos.dim(1)? * 2 != head_dim
        {
            candle_core::bail!("t2-rope-store: shapes differ");
        }
        let dev = q.device().clone();
        let func = dev.get_or_load_custom_func(
            &format!("rope_store_{}", suffix(q.dtype())?),
            MODULE,
            PTX,
        )?;
        let (meta, ml) = self.rows.meta.storage_and_layout();
        let (cos, cl) = self.cos.storage_and_layout();
        let (sin, sl) = self.sin.storage_and_layout();
        let (kp, kpl) = self.k_pool.storage_and_layout();
        let (vp, vpl) = self.v_pool.storage_and_layout();
        let (
            Storage::Cuda(meta),
            Storage::Cuda(cos),
            Storage::Cuda(sin),
            Storage::Cuda(kp),
            Storage::Cuda(vp),
        ) = (&*meta, &*cos, &*sin, &*kp, &*vp)
        else {
            candle_core::bail!("t2-rope-store: a table or pool is not on the GPU");
        };
        let m0 = start(ml, "the step's metadata")?;
        let meta = meta.as_cuda_slice::<u32>()?;
        let row_pos = meta.slice(m0 + self.rows.row_pos..);
        let slots = meta.slice(m0 + self.rows.slots_at..);
        let (h, kvh, hd, half) = (
            heads as i32,
            kv_heads as i32,
            head_dim as i32,
            self.half_style as i32,
        );
        let ((q0, q_stride), (k0, k_stride), (v0, v_stride)) = (
            rows_start(ql, "q")?,
            rows_start(kl, "k")?,
            rows_start(vl, "v")?,
        );
        let offs = [
            q0,
            k0,
            v0,
            start(cl, "cos")?,
            start(sl, "sin")?,
            start(kpl, "the K pool")?,
            start(vpl, "the V pool")?,
        ];
        let cfg = launch_cfg(
            (rows as u32, (heads + kv_heads) as u32),
            (head_dim / 2).clamp(32, 128) as u32,
        );
        let out = with_dtype!(q.dtype(), T, {
            let qs = q.as_cuda_slice::<T>()?.slice(offs[0]..);
            let ks = k.as_cuda_slice::<T>()?.slice(offs[1]..);
            let vs = v.as_cuda_slice::<T>()?.slice(offs[2]..);
            let cs = cos.as_cuda_slice::<T>()?.slice(offs[3]..);
            let ss = sin.as_cuda_slice::<T>()?.slice(offs[4]..);
            let kps = kp.as_cuda_slice::<T>()?.slice(offs[5]..);
            let vps = vp.as_cuda_slice::<T>()?.slice(offs[6]..);
            // SAFETY: the kernel writes every element of q_out.
            let out = unsafe { dev.alloc::<T>(rows * heads * head_dim)? };
            let mut b = func.builder();
            b.arg(&qs)
                .arg(&ks)
                .arg(&vs)
                .arg(&cs)
                .arg(&ss)
                .arg(&row_pos)
                .arg(&slots);
            b.arg(&out)
                .arg(&kps)
                .arg(&vps)
                .arg(&q_stride)
                .arg(&k_stride)
                .arg(&v_stride)
                .arg(&h)
                .arg(&kvh)
                .arg(&hd)
                .arg(&half);
            // SAFETY: the pools are written only at the rows the block manager handed out (checked against
            // the pool's size when the step's upload was built); they are device memory no host code reads
            // meanwhile, so writing them through this shared view races with nothing.
            unsafe { b.launch(cfg) }.w()?;
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        });
        Ok((out, ql.shape().clone()))
    }
}
