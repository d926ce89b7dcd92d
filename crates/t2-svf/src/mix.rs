//! Mixing experts and turning a mix into per-matrix singular-value scales.
//!
//! z = Σₖ αₖ·zₖ (after the sigmoid, so a one-hot α is exactly one expert), then
//! s = σ⊙z·(Σσ / Σ(σ⊙z)): the rescale keeps the nuclear norm, so only the shape of z matters.

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Device, Tensor};
use t2_model::ProjId;

use crate::decompose::Decomposition;
use crate::error::{Result, SvfError};
use crate::expert::Expert;

pub type MixId = u32;
/// The unadapted model (z ≡ 1, s = σ). Always present.
pub const BASE_MIX: MixId = 0;

/// Parses `math=0.7,code=0.3` (a bare name means weight 1).
pub fn parse_mix(spec: &str) -> Result<BTreeMap<String, f32>> {
    let mut out = BTreeMap::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, w) = match part.split_once('=') {
            Some((n, w)) => {
                let w: f32 = w.trim().parse().map_err(|_| {
                    SvfError::BadMix(format!("weight '{w}' of '{n}' is not a number"))
                })?;
                (n.trim(), w)
            }
            None => (part, 1.0),
        };
        if !w.is_finite() {
            return Err(SvfError::BadMix(format!(
                "weight of '{name}' is not finite"
            )));
        }
        if out.insert(name.to_string(), w).is_some() {
            return Err(SvfError::BadMix(format!("'{name}' appears twice")));
        }
    }
    if out.is_empty() {
        return Err(SvfError::BadMix("empty mix".into()));
    }
    Ok(out)
}

/// z = Σ αₖ·zₖ per matrix. A matrix an expert does not adapt counts as z = 1 for it (its neutral value).
pub fn combine(
    decomp: &Decomposition,
    parts: &[(&Expert, f32)],
) -> Result<BTreeMap<ProjId, Vec<f32>>> {
    if parts.is_empty() {
        return Err(SvfError::BadMix("a mix needs at least one expert".into()));
    }
    let mut z = BTreeMap::new();
    for (id, f) in &decomp.factors {
        if parts.iter().all(|(e, _)| !e.z.contains_key(id)) {
            continue;
        }
        let mut acc = vec![0f32; f.rank()];
        for (e, alpha) in parts {
            match e.z.get(id) {
                Some(v) => acc.iter_mut().zip(v).for_each(|(a, &x)| *a += alpha * x),
                None => acc.iter_mut().for_each(|a| *a += alpha),
            }
        }
        z.insert(*id, acc);
    }
    Ok(z)
}

/// s = σ⊙z·(Σσ/Σ(σ⊙z)) for one matrix; refuses a z that would erase it.
pub fn scales(sigma: &[f32], z: &[f32]) -> Result<Vec<f32>> {
    if sigma.len() != z.len() {
        return Err(SvfError::BadMix(format!(
            "z has length {}, σ has {}",
            z.len(),
            sigma.len()
        )));
    }
    let total: f64 = sigma.iter().map(|&s| s as f64).sum();
    let scaled: f64 = sigma
        .iter()
        .zip(z)
        .map(|(&s, &v)| s as f64 * v as f64)
        .sum();
    if !scaled.is_finite() || scaled.abs() <= 1e-6 * total {
        return Err(SvfError::BadMix(
            "Σ(σ⊙z) ≈ 0: the mix would erase a matrix".into(),
        ));
    }
    let k = total / scaled;
    Ok(sigma
        .iter()
        .zip(z)
        .map(|(&s, &v)| (s as f64 * v as f64 * k) as f32)
        .collect())
}

struct Slot {
    name: String,
}

/// The mixes the model can run, each with precomputed scales for every target matrix, stacked per matrix
/// as a (capacity, rank) tensor so that a batch gathers each row's scales with one index_select.
pub struct MixTable {
    slots: Vec<Option<Slot>>,
    by_name: HashMap<String, MixId>,
    /// per matrix: (capacity, rank), in the model's dtype
    pub(crate) stacked: BTreeMap<ProjId, Tensor>,
}

impl MixTable {
    pub fn new(
        decomp: &Decomposition,
        capacity: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let capacity = capacity.max(2);
        let mut stacked = BTreeMap::new();
        for (id, f) in &decomp.factors {
            // Every slot starts as the base model (s = σ), so an unused id can never produce garbage.
            let sigma = f.sigma.to_dtype(dtype)?.to_device(device)?.unsqueeze(0)?;
            stacked.insert(*id, sigma.repeat((capacity, 1))?.contiguous()?);
        }
        let mut slots: Vec<Option<Slot>> = (0..capacity).map(|_| None).collect();
        slots[BASE_MIX as usize] = Some(Slot {
            name: "base".into(),
        });
        Ok(Self {
            slots,
            by_name: HashMap::from([("base".to_string(), BASE_MIX)]),
            stacked,
        })
    }

    pub fn get(&self, name: &str) -> Option<MixId> {
        self.by_name.get(name).copied()
    }

    pub fn name(&self, id: MixId) -> Option<&str> {
        self.slots
            .get(id as usize)?
            .as_ref()
            .map(|s| s.name.as_str())
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// The registered mixes, base included.
    pub fn ids(&self) -> Vec<MixId> {
        (0..self.slots.len())
            .filter(|&i| self.slots[i].is_some())
            .map(|i| i as MixId)
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// Registers (or replaces) a mix under `name` from its z vectors; matrices without z keep s = σ.
    pub fn insert(
        &mut self,
        name: &str,
        decomp: &Decomposition,
        z: &BTreeMap<ProjId, Vec<f32>>,
    ) -> Result<MixId> {
        if name == "base" {
            return Err(SvfError::BadMix(
                "'base' is reserved for the unadapted model".into(),
            ));
        }
        if !self.by_name.contains_key(name) && self.slots.iter().all(Option::is_some) {
            return Err(SvfError::TableFull(self.slots.len()));
        }
        // Compute everything before touching the table, so a bad mix leaves it unchanged.
        let mut rows = Vec::new();
        for (id, f) in &decomp.factors {
            let s = match z.get(id) {
                Some(zv) => scales(&f.sigma_host, zv)?,
                None => f.sigma_host.clone(),
            };
            rows.push((*id, s));
        }
        let id = match self.by_name.get(name) {
            Some(&id) => id,
            None => {
                let free = self
                    .slots
                    .iter()
                    .position(|s| s.is_none())
                    .ok_or(SvfError::TableFull(self.slots.len()))?;
                free as MixId
            }
        };
        for (pid, s) in rows {
            let table = &self.stacked[&pid];
            let row =
                Tensor::from_vec(s, (1, table.dim(1)?), table.device())?.to_dtype(table.dtype())?;
            table.slice_set(&row, 0, id as usize)?;
        }
        self.slots[id as usize] = Some(Slot {
            name: name.to_string(),
        });
        self.by_name.insert(name.to_string(), id);
        Ok(id)
    }

    pub fn remove(&mut self, name: &str) -> Option<MixId> {
        if name == "base" {
            return None;
        }
        let id = self.by_name.remove(name)?;
        self.slots[id as usize] = None;
        Some(id)
    }

    /// The scales of one mix for one matrix: (rank,).
    pub fn scales_of(&self, pid: ProjId, mix: MixId) -> Result<Tensor> {
        Ok(self.stacked[&pid].get(mix as usize)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_mix_accepts_weights_and_bare_names() {
        let m = parse_mix("math=0.7, code=0.3,reasoning").unwrap();
        assert_eq!(m["math"], 0.7);
        assert_eq!(m["code"], 0.3);
        assert_eq!(m["reasoning"], 1.0);
        assert!(parse_mix("math=x").is_err());
        assert!(parse_mix("math=1,math=2").is_err());
        assert!(parse_mix("").is_err());
    }

    #[test]
    fn scales_keep_the_nuclear_norm_and_the_shape_of_z() {
        let sigma = [4.0, 2.0, 1.0];
        let s = scales(&sigma, &[0.5, 1.0, 0.25]).unwrap();
        let total: f32 = s.iter().sum();
        assert!((total - 7.0).abs() < 1e-5);
        // a constant z is the base model
        let s = scales(&sigma, &[0.3, 0.3, 0.3]).unwrap();
        for (a, b) in s.iter().zip(sigma) {
            assert!((a - b).abs() < 1e-6);
        }
        assert!(scales(&sigma, &[0.0, 0.0, 0.0]).is_err());
        assert!(scales(&sigma, &[1.0, 1.0]).is_err());
    }
}
