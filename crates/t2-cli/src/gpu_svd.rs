//! cuSOLVER SVD timing for `t2 decompose-bench --device cuda`.

use anyhow::{bail, Result};

#[cfg(not(feature = "cuda"))]
pub fn time_svd(_ordinal: usize, _data: &[f32], _out: usize, _inp: usize) -> Result<f64> {
    bail!("--device cuda needs a binary built with the cuda feature (cargo build --features cuda)")
}
