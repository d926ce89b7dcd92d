//! Multiplying a batch whose rows carry different mixes.
//!
//! x·W'ᵀ = ((x·V)⊙s)·Uᵀ: the two products are shared by the whole batch and only the scale s differs per
//! row. When every row shares one mix, merged weights W' = (U⊙s)·Vᵀ (cached for hot mixes) make it a
//! single dense product; the base mix always uses the original dense weights.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Mutex, RwLock};

use candle_core::Tensor;
use t2_model::kernels::linear;
use t2_model::{Linear, ProjId, Projector, RowMixes};

use crate::decompose::Decomposition;
use crate::error::Result;
use crate::mix::{MixId, MixTable, BASE_MIX};

/// Merged weights of the most recently merged mixes (least recent evicted first).
struct MergedCache {
    capacity: usize,
    order: VecDeque<MixId>,
    weights: HashMap<MixId, BTreeMap<ProjId, Tensor>>,
}

pub struct SvfProjector {
    pub decomp: Decomposition,
    table: RwLock<MixTable>,
    merged: Mutex<MergedCache>,
}

impl SvfProjector {
    /// `mix_capacity`: how many mixes can be registered at once; `merged_capacity`: how many mixes keep
    /// merged weights (each costs a copy of the target matrices).
    pub fn new(decomp: Decomposition, mix_capacity: usize, merged_capacity: usize) -> Result<Self> {
        let (dtype, device) = match decomp.factors.values().next() {
            Some(f) => (f.u.dtype(), f.u.device().clone()),
            None => (candle_core::DType::F32, candle_core::Device::Cpu),
        };
        let table = MixTable::new(&decomp, mix_capacity, dtype, &device)?;
        Ok(Self {
            decomp,
            table: RwLock::new(table),
            merged: Mutex::new(MergedCache {
                capacity: merged_capacity,
                order: VecDeque::new(),
                weights: HashMap::new(),
            }),
        })
    }

    /// Registers `name` with per-matrix z vectors and returns its id (re-registering replaces it and drops
    /// any merged weights it had).
    pub fn register(&self, name: &str, z: &BTreeMap<ProjId, Vec<f32>>) -> Result<MixId> {
        let id = self.table.write().unwrap().insert(name, &self.decomp, z)?;
        self.unmerge(id);
        Ok(id)
    }

    pub fn remove(&self, name: &str) -> Option<MixId> {
        let id = self.table.write().unwrap().remove(name)?;
        self.unmerge(id);
        Some(id)
    }

    pub fn mix_id(&self, name: &str) -> Option<MixId> {
        self.table.read().unwrap().get(name)
    }

    /// Every registered mix, base included.
    pub fn mix_ids(&self) -> Vec<MixId> {
        self.table.read().unwrap().ids()
    }

    pub fn mix_name(&self, id: MixId) -> Option<String> {
        self.table.read().unwrap().name(id).map(str::to_string)
    }

    fn unmerge(&self, id: MixId) {
        let mut m = self.merged.lock().unwrap();
        m.weights.remove(&id);
        m.order.retain(|&x| x != id);
    }

    pub fn is_merged(&self, id: MixId) -> bool {
        id == BASE_MIX || self.merged.lock().unwrap().weights.contains_key(&id)
    }

    /// Builds merged weights W' = (U⊙s)·Vᵀ for every target matrix of `id`, so that batches that all use
    /// this mix run plain dense products.
    pub fn merge(&self, id: MixId) -> Result<()> {
        if self.is_merged(id) || self.merged.lock().unwrap().capacity == 0 {
            return Ok(());
        }
        // Copy the scales and let go of the table: merging takes seconds and runs beside the model thread,
        // which must stay free to register mixes meanwhile.
        let (name, scales) = {
            let table = self.table.read().unwrap();
            let Some(name) = table.name(id).map(str::to_string) else {
                return Ok(());
            };
            let scales = self
                .decomp
                .factors
                .keys()
                .map(|pid| Ok((*pid, table.scales_of(*pid, id)?.copy()?)))
                .collect::<Result<BTreeMap<_, _>>>()?;
            (name, scales)
        };
        let mut weights = BTreeMap::new();
        for (pid, f) in &self.decomp.factors {
            let s = scales[pid].unsqueeze(0)?;
            weights.insert(*pid, f.u.broadcast_mul(&s)?.matmul(&f.vt)?);
        }
        // Names are content (the canonical adaptation), so the same name still means the same scales.
        if self.mix_name(id).as_deref() != Some(name.as_str()) {
            return Ok(());
        }
        let mut m = self.merged.lock().unwrap();
        while m.weights.len() >= m.capacity {
            let Some(old) = m.order.pop_front() else {
                break;
            };
            m.weights.remove(&old);
        }
        m.weights.insert(id, weights);
        m.order.push_back(id);
        Ok(())
    }

    /// The factored product for rows that may each have their own mix.
    pub fn factored(
        &self,
        lin: &Linear,
        x: &Tensor,
        rows: &RowMixes,
    ) -> candle_core::Result<Tensor> {
        let f = &self.decomp.factors[&lin.id];
        let table = self.table.read().unwrap();
        let stacked = &table.stacked[&lin.id];
        let xv = linear(x, &f.vt)?;
        let scaled = match rows.uniform {
            Some(m) => xv.broadcast_mul(&stacked.get(m as usize)?.unsqueeze(0)?)?,
            None => (xv * stacked.index_select(&rows.ids_tensor, 0)?)?,
        };
        linear(&scaled, &f.u)
    }
}

impl Projector for SvfProjector {
    fn project(&self, lin: &Linear, x: &Tensor, rows: &RowMixes) -> candle_core::Result<Tensor> {
        if !self.decomp.factors.contains_key(&lin.id) || rows.uniform == Some(BASE_MIX) {
            return linear(x, &lin.weight);
        }
        if let Some(m) = rows.uniform {
            let merged = self
                .merged
                .lock()
                .unwrap()
                .weights
                .get(&m)
                .map(|w| w[&lin.id].clone());
            if let Some(w) = merged {
                return linear(x, &w);
            }
        }
        self.factored(lin, x, rows)
    }
}
