use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use t2_model::ProjKind;

/// Which projections of every layer SVF adapts. Embeddings, the output head and norms never are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum TargetSet {
    /// gate, up, down (what the research code adapts)
    Mlp,
    /// q, k, v, o
    Attn,
    /// all seven projections (the paper's best ablation)
    #[default]
    All,
}

impl TargetSet {
    pub fn kinds(self) -> &'static [ProjKind] {
        match self {
            Self::Mlp => &ProjKind::MLP,
            Self::Attn => &ProjKind::ATTN,
            Self::All => &ProjKind::ALL,
        }
    }

    pub fn contains(self, kind: ProjKind) -> bool {
        self.kinds().contains(&kind)
    }

    /// True when every matrix of `other` is also in `self`.
    pub fn covers(self, other: TargetSet) -> bool {
        other.kinds().iter().all(|k| self.contains(*k))
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Mlp => "mlp",
            Self::Attn => "attn",
            Self::All => "all",
        }
    }
}

impl fmt::Display for TargetSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TargetSet {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "mlp" => Ok(Self::Mlp),
            "attn" => Ok(Self::Attn),
            "all" => Ok(Self::All),
            other => Err(format!(
                "unknown target set '{other}' (expected mlp, attn or all)"
            )),
        }
    }
}

impl Serialize for TargetSet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for TargetSet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}
