//! What a request runs with, as one type: a [`Mix`] of stored experts (with the base model's share as a
//! field), or raw z vectors ([`ZVectors`]) for a policy in training; both under [`Adaptation`]. And the
//! arithmetic that turns a mix into per-matrix singular-value scales:
//!
//! z = base·1 + Σₖ αₖ·zₖ (after the sigmoid, so a one-hot α is exactly one expert), then
//! s = σ⊙z·(Σσ / Σ(σ⊙z)): the rescale keeps the nuclear norm, so only the shape of z matters.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};
use t2_model::ProjId;

use crate::decompose::Decomposition;
use crate::error::{Result, SvfError};
use crate::expert::Expert;

/// In the written form of a mix (the API's `mix` object, stored profiles), the key of the unadapted
/// model's share. It is reserved: no expert can be named so.
pub const BASE_SHARE_KEY: &str = "base";

/// α over stored experts plus the unadapted model's share (z ≡ 1 for that share). No expert at all is
/// the base model.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Mix {
    alpha: BTreeMap<String, f32>,
    base: f32,
}

impl Mix {
    /// The unadapted model.
    pub fn base() -> Self {
        Self::default()
    }

    /// One expert, alone.
    pub fn expert(name: &str) -> Self {
        Self {
            alpha: BTreeMap::from([(name.to_string(), 1.0)]),
            base: 0.0,
        }
    }

    /// α per expert and the base share; every weight must be finite.
    pub fn new(alpha: BTreeMap<String, f32>, base: f32) -> Result<Self> {
        if let Some((k, w)) = alpha.iter().find(|(_, w)| !w.is_finite()) {
            return Err(SvfError::BadMix(format!(
                "the weight of '{k}' in the mix is not a finite number ({w})"
            )));
        }
        if !base.is_finite() {
            return Err(SvfError::BadMix(format!(
                "the base share of the mix is not a finite number ({base})"
            )));
        }
        if let Some(k) = alpha.keys().find(|k| k.is_empty() || *k == BASE_SHARE_KEY) {
            return Err(SvfError::BadMix(format!("'{k}' is not an expert's name")));
        }
        Ok(Self { alpha, base })
    }

    /// From the written form: weights by expert name, the base share under [`BASE_SHARE_KEY`].
    pub fn from_weights(weights: &BTreeMap<String, f32>) -> Result<Self> {
        if weights.is_empty() {
            return Err(SvfError::BadMix("the mix names no expert".into()));
        }
        let base = weights.get(BASE_SHARE_KEY).copied().unwrap_or(0.0);
        let alpha = weights
            .iter()
            .filter(|(k, _)| *k != BASE_SHARE_KEY)
            .map(|(k, &w)| (k.clone(), w))
            .collect();
        Self::new(alpha, base)
    }

    /// The written form (see [`Self::from_weights`]); [`Self::base`] is an empty map.
    pub fn weights(&self) -> BTreeMap<String, f32> {
        let mut w = self.alpha.clone();
        if self.base != 0.0 {
            w.insert(BASE_SHARE_KEY.into(), self.base);
        }
        w
    }

    /// No expert takes part: the unadapted model (whatever the base share).
    pub fn is_base(&self) -> bool {
        self.alpha.is_empty()
    }

    /// α by expert name.
    pub fn alpha(&self) -> &BTreeMap<String, f32> {
        &self.alpha
    }

    pub fn base_share(&self) -> f32 {
        self.base
    }

    /// The expert, when the mix is exactly one expert with weight 1.
    pub fn single_expert(&self) -> Option<&str> {
        match self.alpha.iter().next() {
            Some((name, w))
                if self.alpha.len() == 1 && (w - 1.0).abs() < 1e-6 && self.base == 0.0 =>
            {
                Some(name)
            }
            _ => None,
        }
    }

    /// Every weight rounded to a multiple of `step`; weights that round to 0 leave the mix.
    pub fn rounded(&self, step: f32) -> Self {
        let round = |w: f32| (w / step).round() * step;
        Self {
            alpha: self
                .alpha
                .iter()
                .map(|(k, &w)| (k.clone(), round(w)))
                .filter(|(_, w)| *w > 0.0)
                .collect(),
            base: round(self.base).max(0.0),
        }
    }

    /// z = base·1 + Σ αₖ·zₖ for every matrix some expert adapts, the experts looked up by `expert`.
    pub fn z<'a>(
        &self,
        decomp: &Decomposition,
        expert: impl Fn(&str) -> Result<&'a Expert>,
    ) -> Result<BTreeMap<ProjId, Vec<f32>>> {
        let parts = self
            .alpha
            .iter()
            .map(|(name, &w)| Ok((expert(name)?, w)))
            .collect::<Result<Vec<_>>>()?;
        let mut z = combine(decomp, &parts)?;
        if self.base != 0.0 {
            z.values_mut()
                .for_each(|v| v.iter_mut().for_each(|x| *x += self.base));
        }
        Ok(z)
    }
}

/// What the `x-t2-mix` header says: `base`, `expert:math`, `mix:base=0.2,code=0.3,math=0.5`.
impl fmt::Display for Mix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_base() {
            return f.write_str("base");
        }
        if let Some(e) = self.single_expert() {
            return write!(f, "expert:{e}");
        }
        let parts: Vec<String> = self
            .weights()
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        write!(f, "mix:{}", parts.join(","))
    }
}

impl Serialize for Mix {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.weights().serialize(s)
    }
}

impl<'de> Deserialize<'de> for Mix {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let w = BTreeMap::<String, f32>::deserialize(d)?;
        Self::from_weights(&w).map_err(serde::de::Error::custom)
    }
}

/// Per-matrix z given directly (the policy being trained, an expert file under evaluation), shared cheaply
/// between requests. Its identity is a digest of its contents, so changed vectors never reuse a table slot.
#[derive(Clone)]
pub struct ZVectors {
    z: Arc<BTreeMap<ProjId, Vec<f32>>>,
    digest: String,
}

impl ZVectors {
    pub fn new(z: BTreeMap<ProjId, Vec<f32>>) -> Self {
        let digest = z_digest(&z);
        Self {
            z: Arc::new(z),
            digest,
        }
    }

    pub fn z(&self) -> &BTreeMap<ProjId, Vec<f32>> {
        &self.z
    }

    pub fn digest(&self) -> &str {
        &self.digest
    }
}

impl PartialEq for ZVectors {
    fn eq(&self, other: &Self) -> bool {
        self.digest == other.digest
    }
}

impl fmt::Debug for ZVectors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ZVectors({} matrices, {})",
            self.z.len(),
            &self.digest[..12]
        )
    }
}

/// A hex SHA-256 of z vectors: matrix names and values, in matrix order.
pub fn z_digest(z: &BTreeMap<ProjId, Vec<f32>>) -> String {
    let mut h = Sha256::new();
    for (id, v) in z {
        h.update(id.name().as_bytes());
        h.update((v.len() as u64).to_le_bytes());
        for x in v {
            h.update(x.to_le_bytes());
        }
    }
    hex::encode(h.finalize())
}

/// How a request wants the model adapted.
#[derive(Debug, Clone, PartialEq)]
pub enum Adaptation {
    Mix(Mix),
    Vectors(ZVectors),
}

impl Adaptation {
    pub fn base() -> Self {
        Self::Mix(Mix::base())
    }

    pub fn expert(name: &str) -> Self {
        Self::Mix(Mix::expert(name))
    }

    pub fn is_base(&self) -> bool {
        matches!(self, Self::Mix(m) if m.is_base())
    }
}

impl From<Mix> for Adaptation {
    fn from(m: Mix) -> Self {
        Self::Mix(m)
    }
}

impl fmt::Display for Adaptation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Mix(m) => m.fmt(f),
            Self::Vectors(z) => write!(f, "z:{}", &z.digest[..12]),
        }
    }
}

/// The identity of an adaptation's weights: equal keys mean equal scales. It names each expert together
/// with its content digest, so an expert replaced under the same name gets a new key (and nothing cached
/// for the old contents is reused). Never shown to clients: the header is [`Mix`]'s `Display`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MixKey(String);

impl MixKey {
    pub fn base() -> Self {
        Self("base".into())
    }

    /// The key of a mix whose experts have the given content digests.
    pub fn of_mix<'a>(mix: &Mix, digest: impl Fn(&str) -> Result<&'a str>) -> Result<Self> {
        if mix.is_base() {
            return Ok(Self::base());
        }
        let mut parts = Vec::with_capacity(mix.alpha.len() + 1);
        for (name, w) in &mix.alpha {
            parts.push(format!("{name}@{}={:08x}", digest(name)?, w.to_bits()));
        }
        if mix.base != 0.0 {
            parts.push(format!("+{:08x}", mix.base.to_bits()));
        }
        Ok(Self(parts.join(",")))
    }

    pub fn of_vectors(z: &ZVectors) -> Self {
        Self(format!("z@{}", z.digest))
    }

    pub fn is_base(&self) -> bool {
        self.0 == "base"
    }

    /// Whether these weights were made from the expert `name` with contents `digest`. Expert names keep
    /// to an alphabet without ',', '@' and '=', so the key's parts split unambiguously.
    pub fn uses(&self, name: &str, digest: &str) -> bool {
        self.0.split(',').any(|part| {
            part.split_once('@').is_some_and(|(n, rest)| {
                n == name && rest.split_once('=').is_some_and(|(d, _)| d == digest)
            })
        })
    }
}

/// Parses `math=0.7,code=0.3` (a bare name means weight 1; `base=w` is the base share).
pub fn parse_mix(spec: &str) -> Result<Mix> {
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
        if out.insert(name.to_string(), w).is_some() {
            return Err(SvfError::BadMix(format!("'{name}' appears twice")));
        }
    }
    if out.is_empty() {
        return Err(SvfError::BadMix("empty mix".into()));
    }
    Mix::from_weights(&out)
}

/// z = Σ αₖ·zₖ per matrix. A matrix an expert does not adapt counts as z = 1 for it (its neutral value).
pub fn combine(
    decomp: &Decomposition,
    parts: &[(&Expert, f32)],
) -> Result<BTreeMap<ProjId, Vec<f32>>> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_mix_accepts_weights_and_bare_names() {
        let m = parse_mix("math=0.7, code=0.3,reasoning").unwrap();
        assert_eq!(m.alpha()["math"], 0.7);
        assert_eq!(m.alpha()["code"], 0.3);
        assert_eq!(m.alpha()["reasoning"], 1.0);
        assert_eq!(parse_mix("math=0.5,base=0.5").unwrap().base_share(), 0.5);
        assert!(parse_mix("math=x").is_err());
        assert!(parse_mix("math=1,math=2").is_err());
        assert!(parse_mix("math=inf").is_err());
        assert!(parse_mix("").is_err());
    }

    #[test]
    fn the_written_form_round_trips_and_names_the_mix() {
        let m = Mix::from_weights(&BTreeMap::from([
            ("math".to_string(), 0.5),
            ("code".to_string(), 0.25),
            ("base".to_string(), 0.25),
        ]))
        .unwrap();
        assert_eq!(m.base_share(), 0.25);
        assert_eq!(m.alpha().len(), 2);
        assert_eq!(Mix::from_weights(&m.weights()).unwrap(), m);
        assert_eq!(m.to_string(), "mix:base=0.25,code=0.25,math=0.5");
        assert_eq!(Mix::expert("math").to_string(), "expert:math");
        assert_eq!(Mix::base().to_string(), "base");
        assert!(Mix::base().weights().is_empty());
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(serde_json::from_str::<Mix>(&json).unwrap(), m);
    }

    #[test]
    fn keys_follow_expert_contents_not_names() {
        let m = Mix::expert("math");
        let k1 = MixKey::of_mix(&m, |_| Ok("aaaa")).unwrap();
        let k2 = MixKey::of_mix(&m, |_| Ok("bbbb")).unwrap();
        assert_ne!(k1, k2);
        assert_eq!(k1, MixKey::of_mix(&m, |_| Ok("aaaa")).unwrap());
        assert!(k1.uses("math", "aaaa") && !k1.uses("math", "bbbb") && !k1.uses("code", "aaaa"));
        let both = Mix::from_weights(&BTreeMap::from([
            ("math".to_string(), 0.5),
            ("code".to_string(), 0.5),
        ]))
        .unwrap();
        let kb = MixKey::of_mix(&both, |n| Ok(if n == "math" { "aaaa" } else { "cccc" })).unwrap();
        assert!(kb.uses("math", "aaaa") && kb.uses("code", "cccc") && !kb.uses("code", "aaaa"));
        assert!(MixKey::of_mix(&Mix::base(), |_| unreachable!())
            .unwrap()
            .is_base());
        let z = |v: f32| {
            ZVectors::new(BTreeMap::from([(
                ProjId::parse("layers.0.q_proj").unwrap(),
                vec![v; 4],
            )]))
        };
        assert_eq!(MixKey::of_vectors(&z(1.0)), MixKey::of_vectors(&z(1.0)));
        assert_ne!(MixKey::of_vectors(&z(1.0)), MixKey::of_vectors(&z(0.5)));
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
