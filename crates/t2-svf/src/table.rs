//! The mixes the model can run right now, each with precomputed scales for every target matrix, stacked
//! per matrix as a (capacity, rank) tensor so that a batch gathers each row's scales with one index_select.
//!
//! A sequence holds its slot through a [`MixLease`]: cloning it adds a holder, dropping it lets go. A slot
//! nobody holds stays registered (a later request with the same mix reuses it) until the table needs room,
//! when the least recently leased idle slot is evicted. Nothing is released by hand.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use t2_model::ProjId;

use crate::decompose::Decomposition;
use crate::error::{Result, SvfError};
use crate::mix::{scales, MixKey};

/// A row of the mix table, as the model's rows refer to it.
pub type MixId = u32;
/// The unadapted model (z ≡ 1, s = σ). Always present, never evicted.
pub const BASE_MIX: MixId = 0;

/// Holders per slot, shared with the leases (which must be able to let go without the table's lock).
#[derive(Debug)]
struct Holders(Vec<AtomicUsize>);

/// A hold on one slot of the mix table: while any lease of a slot lives, the slot keeps its mix.
#[derive(Debug)]
pub struct MixLease {
    id: MixId,
    holders: Option<Arc<Holders>>,
}

impl MixLease {
    /// The base model, for an engine without a mix table (nothing to hold).
    pub fn unheld_base() -> Self {
        Self {
            id: BASE_MIX,
            holders: None,
        }
    }

    fn new(id: MixId, holders: &Arc<Holders>) -> Self {
        holders.0[id as usize].fetch_add(1, Ordering::SeqCst);
        Self {
            id,
            holders: Some(holders.clone()),
        }
    }

    /// The table row this lease holds.
    pub fn id(&self) -> MixId {
        self.id
    }

    pub fn is_base(&self) -> bool {
        self.id == BASE_MIX
    }
}

impl Clone for MixLease {
    fn clone(&self) -> Self {
        match &self.holders {
            Some(h) => Self::new(self.id, h),
            None => Self::unheld_base(),
        }
    }
}

impl Drop for MixLease {
    fn drop(&mut self) {
        if let Some(h) = &self.holders {
            h.0[self.id as usize].fetch_sub(1, Ordering::SeqCst);
        }
    }
}

struct Slot {
    key: MixKey,
    /// When the slot was last leased (a counter, for least-recently-used eviction).
    last_leased: u64,
}

pub struct MixTable {
    slots: Vec<Option<Slot>>,
    by_key: HashMap<MixKey, MixId>,
    holders: Arc<Holders>,
    clock: u64,
    /// per matrix: (capacity, rank), in the model's dtype
    pub(crate) stacked: BTreeMap<ProjId, Tensor>,
}

/// What [`MixTable::lease`] did to get a slot.
pub struct Leased {
    pub lease: MixLease,
    /// A slot whose previous mix was evicted (or newly filled) for this one: anything derived from the old
    /// contents of that slot (merged weights) is stale.
    pub refilled: Option<MixId>,
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
            key: MixKey::base(),
            last_leased: 0,
        });
        Ok(Self {
            slots,
            by_key: HashMap::from([(MixKey::base(), BASE_MIX)]),
            holders: Arc::new(Holders(
                (0..capacity).map(|_| AtomicUsize::new(0)).collect(),
            )),
            clock: 0,
            stacked,
        })
    }

    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Registered mixes, base included.
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    pub fn key(&self, id: MixId) -> Option<&MixKey> {
        self.slots.get(id as usize)?.as_ref().map(|s| &s.key)
    }

    /// Holders of a slot right now.
    pub fn holders(&self, id: MixId) -> usize {
        self.holders.0[id as usize].load(Ordering::SeqCst)
    }

    /// Slots other than the base that some lease holds.
    pub fn held(&self) -> usize {
        (1..self.slots.len())
            .filter(|&i| self.holders(i as MixId) > 0)
            .count()
    }

    /// Every registered mix other than the base: its slot, key and holders now.
    pub fn registered(&self) -> Vec<(MixId, MixKey, usize)> {
        (1..self.slots.len())
            .filter_map(|i| {
                let s = self.slots[i].as_ref()?;
                Some((i as MixId, s.key.clone(), self.holders(i as MixId)))
            })
            .collect()
    }

    /// Unregisters every idle slot whose key `stale` matches (an expert removed or replaced: nothing may
    /// ever reuse its weights). Held slots stay until their sequences end. Returns the freed slots.
    pub fn forget(&mut self, stale: impl Fn(&MixKey) -> bool) -> Vec<MixId> {
        let mut freed = Vec::new();
        for i in 1..self.slots.len() {
            let id = i as MixId;
            let drop_it = self.slots[i]
                .as_ref()
                .is_some_and(|s| stale(&s.key) && self.holders(id) == 0);
            if drop_it {
                if let Some(old) = self.slots[i].take() {
                    self.by_key.remove(&old.key);
                }
                freed.push(id);
            }
        }
        freed
    }

    /// A lease on the slot of `key` if it is registered.
    pub fn lease_registered(&mut self, key: &MixKey) -> Option<MixLease> {
        let id = *self.by_key.get(key)?;
        self.clock += 1;
        if let Some(s) = self.slots[id as usize].as_mut() {
            s.last_leased = self.clock;
        }
        Some(MixLease::new(id, &self.holders))
    }

    /// A lease on the slot of `key`, registering it from `z` (matrices without z keep s = σ) in a free or
    /// evicted idle slot when it is new. [`SvfError::TableFull`] when every slot is held.
    pub fn lease(
        &mut self,
        key: &MixKey,
        decomp: &Decomposition,
        z: impl FnOnce() -> Result<BTreeMap<ProjId, Vec<f32>>>,
    ) -> Result<Leased> {
        if let Some(lease) = self.lease_registered(key) {
            return Ok(Leased {
                lease,
                refilled: None,
            });
        }
        let id = self
            .free_slot()
            .ok_or(SvfError::TableFull(self.slots.len()))?;
        // Compute everything before touching the table, so a bad mix leaves it unchanged.
        let z = z()?;
        let mut rows = Vec::with_capacity(decomp.factors.len());
        for (pid, f) in &decomp.factors {
            let s = match z.get(pid) {
                Some(zv) => scales(&f.sigma_host, zv)?,
                None => f.sigma_host.clone(),
            };
            rows.push((*pid, s));
        }
        for (pid, s) in rows {
            let table = &self.stacked[&pid];
            let row =
                Tensor::from_vec(s, (1, table.dim(1)?), table.device())?.to_dtype(table.dtype())?;
            table.slice_set(&row, 0, id as usize)?;
        }
        if let Some(old) = self.slots[id as usize].take() {
            self.by_key.remove(&old.key);
        }
        self.clock += 1;
        self.slots[id as usize] = Some(Slot {
            key: key.clone(),
            last_leased: self.clock,
        });
        self.by_key.insert(key.clone(), id);
        Ok(Leased {
            lease: MixLease::new(id, &self.holders),
            refilled: Some(id),
        })
    }

    /// An empty slot, else the least recently leased one that nobody holds.
    fn free_slot(&self) -> Option<MixId> {
        if let Some(i) = self.slots.iter().position(Option::is_none) {
            return Some(i as MixId);
        }
        (1..self.slots.len())
            .filter(|&i| self.holders(i as MixId) == 0)
            .min_by_key(|&i| self.slots[i].as_ref().map_or(0, |s| s.last_leased))
            .map(|i| i as MixId)
    }

    /// The scales of one mix for one matrix: (rank,).
    pub fn scales_of(&self, pid: ProjId, mix: MixId) -> Result<Tensor> {
        Ok(self.stacked[&pid].get(mix as usize)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mix::Mix;
    use crate::targets::TargetSet;
    use t2_model::{random_llama, LlamaConfig};

    #[test]
    fn forgetting_an_expert_frees_idle_slots_and_keeps_held_ones() {
        let m = random_llama(&LlamaConfig::tiny(), DType::F32, &Device::Cpu, 5).unwrap();
        let d = Decomposition::compute(&m, "0123456789abcdef", TargetSet::All, false).unwrap();
        let mut t = MixTable::new(&d, 4, DType::F32, &Device::Cpu).unwrap();
        let key = |digest: &str| MixKey::of_mix(&Mix::expert("math"), |_| Ok(digest)).unwrap();
        let z = || Ok(BTreeMap::new());
        let held = t.lease(&key("aaaa"), &d, z).unwrap().lease;
        drop(t.lease(&key("bbbb"), &d, z).unwrap().lease);
        assert_eq!(t.registered().len(), 2);
        let freed = t.forget(|k| k.uses("math", "aaaa") || k.uses("math", "bbbb"));
        assert_eq!(freed.len(), 1, "only the idle slot goes");
        assert!(t.lease_registered(&key("bbbb")).is_none());
        assert_eq!(t.registered(), vec![(held.id(), key("aaaa"), 1)]);
        drop(held);
        assert_eq!(t.forget(|k| k.uses("math", "aaaa")), vec![1]);
        assert!(t.registered().is_empty());
    }
}
