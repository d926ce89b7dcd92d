//! Projections that read the same input (q, k and v; gate and up) stacked into one weight, so that rows on
//! the base weights take one GEMM for all of them. On a GPU every GEMM is a kernel launch, and at batch 1
//! the host's time per launch, not the device, bounds a decode step: stacking q/k/v and gate/up takes three
//! of a layer's twelve launches away. The parts keep their own `Linear`s (SVF, merges, training and export
//! address matrices one by one), but their weights become views into the stack, so nothing is held twice.

use candle_core::{Device, Layout, Tensor};

use crate::llama::{Linear, Llama, Projector, RowMixes};

/// Several projections' weights (and biases) stacked by output rows, in the parts' order.
#[derive(Debug, Clone)]
pub struct Stacked {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Stacked {
    /// Stacks `parts` (same input width) and makes each part's weight and bias a view into the stack.
    /// None where stacking does not apply: a part without its dense weight (released to the CPU's packed
    /// copy), or biases on some parts only.
    pub fn stack(parts: &mut [&mut Linear]) -> candle_core::Result<Option<Self>> {
        let Some(weights) = parts
            .iter()
            .map(|l| l.weight().ok().cloned())
            .collect::<Option<Vec<_>>>()
        else {
            return Ok(None);
        };
        let biases: Vec<Tensor> = parts.iter().filter_map(|l| l.bias.clone()).collect();
        if !biases.is_empty() && biases.len() != parts.len() {
            return Ok(None);
        }
        let weight = Tensor::cat(&weights, 0)?;
        let bias = match biases.is_empty() {
            true => None,
            false => Some(Tensor::cat(&biases, 0)?),
        };
        let mut at = 0;
        for l in parts.iter_mut() {
            let rows = l.dims().0;
            l.set_weight(weight.narrow(0, at, rows)?);
            if let Some(b) = &bias {
                l.bias = Some(b.narrow(0, at, rows)?);
            }
            at += rows;
        }
        Ok(Some(Self { weight, bias }))
    }

    /// x·Wᵀ + b for every part at once: (rows, Σ parts' outputs), the parts side by side in each row.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = crate::kernels::linear(x, &self.weight)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    /// The stack, if every part multiplies every row by its base weights (else the parts go one by one).
    pub fn serving<'a>(
        stack: &'a Option<Self>,
        parts: &[&Linear],
        p: &dyn Projector,
        rows: &RowMixes,
    ) -> Option<&'a Self> {
        stack
            .as_ref()
            .filter(|_| parts.iter().all(|l| p.uses_base(l, rows)))
    }
}

impl Llama {
    /// Stacks every layer's q/k/v and gate/up weights ([`Stacked`]); a model already stacked stays as it
    /// is. [`Llama`] does this itself on a GPU ([`stacks_projections`]); on the CPU the packed kernels
    /// stream each weight once either way, and tests call it to check the stacked path there.
    pub fn stack_projections(&mut self) -> candle_core::Result<()> {
        for b in &mut self.blocks {
            if b.attn.qkv.is_none() {
                b.attn.qkv = Stacked::stack(&mut [&mut b.attn.q, &mut b.attn.k, &mut b.attn.v])?;
            }
            if b.mlp.gate_up.is_none() {
                b.mlp.gate_up = Stacked::stack(&mut [&mut b.mlp.gate, &mut b.mlp.up])?;
            }
        }
        Ok(())
    }

    /// Whether every layer's q/k/v and gate/up are stacked.
    pub fn is_stacked(&self) -> bool {
        self.blocks
            .iter()
            .all(|b| b.attn.qkv.is_some() && b.mlp.gate_up.is_some())
    }
}

/// Whether a model on `device` stacks its projections when built: on a GPU, unless `T2_CUDA_UNFUSED=1`
/// or `T2_CUDA_UNSTACKED=1` (to tell a fault of the stacked path from the rest).
pub fn stacks_projections(device: &Device) -> bool {
    #[cfg(feature = "cuda")]
    {
        device.is_cuda() && crate::cuda::stacking()
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = device;
        false
    }
}

/// (first element, row stride) of a layout whose rows (dim 0) each lie contiguous in memory, however far
/// apart: a column range of a wider matrix, such as one part of a stacked projection's output, which the
/// GPU kernels read in place. None for any other layout.
pub fn rows_layout(l: &Layout) -> Option<(usize, usize)> {
    let (dims, strides) = (l.dims(), l.stride());
    let mut row_len = 1;
    for i in (1..dims.len()).rev() {
        if dims[i] > 1 && strides[i] != row_len {
            return None;
        }
        row_len *= dims[i];
    }
    let row_stride = match dims.first() {
        Some(&rows) if rows > 1 => strides[0],
        _ => row_len,
    };
    (row_stride >= row_len).then_some((l.start_offset(), row_stride))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_of_a_stacked_output_are_read_in_place_and_other_layouts_are_not() {
        // (rows 3, heads 4 + 2 + 2, head_dim 5), as a stacked q/k/v output is viewed.
        let y = Tensor::zeros((3, 8, 5), candle_core::DType::F32, &Device::Cpu).unwrap();
        let row = 8 * 5;
        assert_eq!(rows_layout(y.layout()), Some((0, row)));
        let q = y.narrow(1, 0, 4).unwrap();
        let k = y.narrow(1, 4, 2).unwrap();
        let v = y.narrow(1, 6, 2).unwrap();
        assert_eq!(rows_layout(q.layout()), Some((0, row)));
        assert_eq!(rows_layout(k.layout()), Some((4 * 5, row)));
        assert_eq!(rows_layout(v.layout()), Some((6 * 5, row)));
        // A single row: its stride is its own length, whatever the view's.
        let one = y.narrow(0, 2, 1).unwrap().narrow(1, 4, 2).unwrap();
        assert_eq!(rows_layout(one.layout()), Some((2 * row + 4 * 5, 2 * 5)));
        // gate/up halves of a (rows, 2·width) output.
        let gu = Tensor::zeros((3, 12), candle_core::DType::F32, &Device::Cpu).unwrap();
        let up = gu.narrow(1, 6, 6).unwrap();
        assert_eq!(rows_layout(up.layout()), Some((6, 12)));
        // Rows that are not contiguous inside: a column slice within a head, a transpose.
        assert_eq!(rows_layout(y.narrow(2, 0, 4).unwrap().layout()), None);
        assert_eq!(rows_layout(gu.t().unwrap().layout()), None);
        assert_eq!(rows_layout(y.transpose(0, 1).unwrap().layout()), None);
    }
}
