//! Multiplying a batch whose rows carry different mixes.
//!
//! x·W'ᵀ = ((x·V)⊙s)·Uᵀ: the two products are shared by the whole batch and only the scale s differs per
//! row. When every row shares one mix, merged weights W' = (U⊙s)·Vᵀ (cached for hot mixes) make it a
//! single dense product; the base mix always uses the original dense weights.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Mutex, RwLock};

use candle_core::Tensor;
use t2_model::gemm::PackedWeight;
use t2_model::kernels::{linear_packed, pack};
use t2_model::{Linear, ProjId, Projector, RowMixes};

use crate::decompose::Decomposition;
use crate::error::Result;
use crate::mix::MixKey;
use crate::table::{MixId, MixLease, MixTable, BASE_MIX};

/// Merged weights of the most recently merged mixes (least recent evicted first).
struct MergedCache {
    capacity: usize,
    order: VecDeque<MixId>,
    /// Per matrix, W' with its packed copy for the GEMM (packed here, off the model thread).
    weights: HashMap<MixId, BTreeMap<ProjId, Linear>>,
}

/// One registered mix as [`SvfProjector::slots`] reports it.
#[derive(Debug, Clone)]
pub struct SlotUse {
    pub key: MixKey,
    /// Leases held on it now (sequences running with it).
    pub holders: usize,
    pub merged: bool,
}

pub struct SvfProjector {
    pub decomp: Decomposition,
    /// Vᵀ and U of every factored matrix in the GEMM's layout, packed once here (None where the packed
    /// kernel does not apply, e.g. half-precision factors).
    packed: HashMap<ProjId, [Option<PackedWeight>; 2]>,
    table: RwLock<MixTable>,
    merged: Mutex<MergedCache>,
    /// The factors' dtype as loaded (what merged weights are made in).
    dtype: candle_core::DType,
}

impl SvfProjector {
    /// `mix_capacity`: how many mixes can be registered at once; `merged_capacity`: how many mixes keep
    /// merged weights (each costs a copy of the target matrices).
    pub fn new(decomp: Decomposition, mix_capacity: usize, merged_capacity: usize) -> Result<Self> {
        let (dtype, device) = match decomp.factors.values().next() {
            Some(f) => (f.u()?.dtype(), f.u()?.device().clone()),
            None => (candle_core::DType::F32, candle_core::Device::Cpu),
        };
        let table = MixTable::new(&decomp, mix_capacity, dtype, &device)?;
        let packed = decomp
            .factors
            .iter()
            .map(|(id, f)| Ok((*id, [pack(f.vt()?), pack(f.u()?)])))
            .collect::<Result<_>>()?;
        Ok(Self {
            decomp,
            packed,
            dtype,
            table: RwLock::new(table),
            merged: Mutex::new(MergedCache {
                capacity: merged_capacity,
                order: VecDeque::new(),
                weights: HashMap::new(),
            }),
        })
    }

    /// Re-packs the factors Vᵀ and U in half precision (the CPU's `--dtype f16|bf16`, whose base weights are
    /// half too), so a row with a mix streams half the factor bytes; the products still sum in f32.
    pub fn store_factors_as(&mut self, half: candle_core::DType) -> Result<()> {
        for (id, f) in &self.decomp.factors {
            let p = [
                pack(&f.vt()?.to_dtype(half)?),
                pack(&f.u()?.to_dtype(half)?),
            ];
            self.packed.insert(*id, p);
        }
        Ok(())
    }

    /// Drops U and Vᵀ of every matrix whose two factors are packed, so a server holds them once (merging
    /// then reads the packed values); returns the bytes freed. Training reads the factors densely: it
    /// runs on a projector that kept them.
    pub fn release_dense(&mut self) -> usize {
        let packed = &self.packed;
        self.decomp
            .factors
            .iter_mut()
            .filter(|(id, _)| matches!(packed.get(id), Some([Some(_), Some(_)])))
            .map(|(_, f)| f.release())
            .sum()
    }

    /// Bytes resident for the factors: (the decomposition's U, σ and Vᵀ as loaded, their packed copies that
    /// the CPU kernels stream).
    pub fn factor_bytes(&self) -> (usize, usize) {
        let tensors = self.decomp.factors.values().map(factor_tensor_bytes).sum();
        let packed = self
            .packed
            .values()
            .flat_map(|pair| pair.iter().flatten().map(|p| p.bytes()))
            .sum();
        (tensors, packed)
    }

    /// A lease on the mix `key`, registered from `z` if it is not in the table yet (see
    /// [`MixTable::lease`]).
    pub fn lease(
        &self,
        key: &MixKey,
        z: impl FnOnce() -> Result<BTreeMap<ProjId, Vec<f32>>>,
    ) -> Result<MixLease> {
        if let Some(lease) = self.table.write().unwrap().lease_registered(key) {
            return Ok(lease);
        }
        let leased = self.table.write().unwrap().lease(key, &self.decomp, z)?;
        if let Some(id) = leased.refilled {
            self.unmerge(id);
        }
        Ok(leased.lease)
    }

    /// A lease on the base model's slot.
    pub fn lease_base(&self) -> MixLease {
        self.table
            .write()
            .unwrap()
            .lease_registered(&MixKey::base())
            .expect("the base mix is always registered")
    }

    /// Mix slots (other than the base) that some sequence holds.
    pub fn held_slots(&self) -> usize {
        self.table.read().unwrap().held()
    }

    /// Registered mixes, base included.
    pub fn registered(&self) -> usize {
        self.table.read().unwrap().len()
    }

    /// Every registered mix other than the base: its key, holders and whether merged weights exist.
    pub fn slots(&self) -> Vec<SlotUse> {
        let registered = self.table.read().unwrap().registered();
        let merged = self.merged.lock().unwrap();
        registered
            .into_iter()
            .map(|(id, key, holders)| SlotUse {
                merged: merged.weights.contains_key(&id),
                key,
                holders,
            })
            .collect()
    }

    /// Drops the idle slots (and their merged weights) whose key `stale` matches; see
    /// [`MixTable::forget`]. Returns how many went.
    pub fn forget(&self, stale: impl Fn(&MixKey) -> bool) -> usize {
        let freed = self.table.write().unwrap().forget(stale);
        for &id in &freed {
            self.unmerge(id);
        }
        freed.len()
    }

    fn unmerge(&self, id: MixId) {
        let mut m = self.merged.lock().unwrap();
        m.weights.remove(&id);
        m.order.retain(|&x| x != id);
    }

    /// Device bytes this projector holds or may come to hold: (U, σ and Vᵀ of every factored matrix, the
    /// mix table, merged weights at full capacity).
    pub fn resident_bytes(&self) -> (usize, usize, usize) {
        let bytes = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let (tensors, packed) = self.factor_bytes();
        let factors = tensors + packed;
        let table = self.table.read().unwrap().stacked.values().map(bytes).sum();
        let one_merge: usize = self
            .decomp
            .factors
            .values()
            .map(|f| f.out * f.inp * self.dtype.size_in_bytes())
            .sum();
        (
            factors,
            table,
            one_merge * self.merged.lock().unwrap().capacity,
        )
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
        let (key, scales) = {
            let table = self.table.read().unwrap();
            let Some(key) = table.key(id).cloned() else {
                return Ok(());
            };
            let scales = self
                .decomp
                .factors
                .keys()
                .map(|pid| Ok((*pid, table.scales_of(*pid, id)?.copy()?)))
                .collect::<Result<BTreeMap<_, _>>>()?;
            (key, scales)
        };
        let mut weights = BTreeMap::new();
        for (pid, f) in &self.decomp.factors {
            let s = scales[pid].unsqueeze(0)?;
            let weight = match f.is_released() {
                false => f.u()?.broadcast_mul(&s)?.matmul(f.vt()?)?,
                // Only the packed copies are left: merge from the values they hold (the ones the
                // factored path multiplies with, so merged and factored rows still agree).
                true => {
                    let [pv, pu] = &self.packed[pid];
                    let (Some(pv), Some(pu)) = (pv, pu) else {
                        unreachable!("factors are released only where both are packed")
                    };
                    let dev = s.device();
                    let u = Tensor::from_vec(pu.values(), pu.dims(), dev)?;
                    let vt = Tensor::from_vec(pv.values(), pv.dims(), dev)?;
                    u.broadcast_mul(&s.to_dtype(candle_core::DType::F32)?)?
                        .matmul(&vt)?
                        .to_dtype(self.dtype)?
                }
            };
            let mut lin = Linear::new(*pid, weight, None);
            lin.packed = pack(lin.weight()?).map(std::sync::Arc::new);
            weights.insert(*pid, lin);
        }
        // Keys are content, so the same key in the slot still means the same scales. The merged lock is
        // taken under the table's read lock, so the slot cannot be refilled (and unmerged) in between.
        let table = self.table.read().unwrap();
        if table.key(id) != Some(&key) {
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
        let [pv, pu] = &self.packed[&lin.id];
        let xv = linear_packed(x, f.vt().ok(), pv.as_ref())?;
        let scaled = match rows.uniform {
            Some(m) => xv.broadcast_mul(&stacked.get(m as usize)?.unsqueeze(0)?)?,
            None => t2_model::kernels::scale_rows(&xv, stacked, rows)?,
        };
        linear_packed(&scaled, f.u().ok(), pu.as_ref())
    }
}

impl Projector for SvfProjector {
    fn project(&self, lin: &Linear, x: &Tensor, rows: &RowMixes) -> candle_core::Result<Tensor> {
        if self.uses_base(lin, rows) {
            return lin.dense(x);
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
                return w.dense(x);
            }
        }
        self.factored(lin, x, rows)
    }

    fn uses_base(&self, lin: &Linear, rows: &RowMixes) -> bool {
        !self.decomp.factors.contains_key(&lin.id) || rows.uniform == Some(BASE_MIX)
    }
}

/// Bytes of a matrix's U, σ and Vᵀ tensors that are still held.
fn factor_tensor_bytes(f: &crate::decompose::Factors) -> usize {
    let bytes = |t: candle_core::Result<&Tensor>| {
        t.map_or(0, |t| t.elem_count() * t.dtype().size_in_bytes())
    };
    bytes(f.u()) + bytes(Ok(&f.sigma)) + bytes(f.vt())
}
