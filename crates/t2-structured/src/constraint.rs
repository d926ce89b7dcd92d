//! A compiled grammar as the sampler's [`TokenConstraint`]: from the first token, or from the moment the
//! answer contains a trigger (the start of a tool call), so that free text before it stays free.

use std::sync::Arc;
use std::time::{Duration, Instant};

use llguidance::Matcher;
use t2_model::TokenConstraint;
use toktrie::SimpleVob;

use crate::vocab::{Grammar, Vocabulary};

/// Told how long each mask took to compute (for the metrics).
pub type MaskObserver = Arc<dyn Fn(Duration) + Send + Sync>;

/// Text that switches a grammar on: the grammar then reads the answer from the trigger's first byte.
#[derive(Debug, Clone, PartialEq)]
pub struct Trigger {
    pub bytes: Vec<u8>,
    /// Only when nothing but whitespace precedes it (a Llama-3.1 call is the whole answer).
    pub at_start: bool,
}

pub struct GrammarConstraint {
    matcher: Matcher,
    vocab: Arc<Vocabulary>,
    /// The allowed set for the next token, once prepared.
    mask: Option<SimpleVob>,
    /// Waiting for one of these before constraining anything (empty: active from the start).
    triggers: Vec<Trigger>,
    active: bool,
    /// While waiting: the answer's bytes, and where each token started in them.
    text: Vec<u8>,
    starts: Vec<(usize, u32)>,
    /// The grammar cannot go on (it failed on the model's own text): only end-of-sequence is allowed if
    /// it was active from the start, nothing is constrained any more if it was triggered.
    broken: bool,
    observer: Option<MaskObserver>,
}

impl GrammarConstraint {
    /// Holds the whole answer to `grammar`.
    pub fn new(grammar: Grammar, vocab: Arc<Vocabulary>, observer: Option<MaskObserver>) -> Self {
        Self::triggered(grammar, vocab, Vec::new(), observer)
    }

    /// Leaves the answer free until it contains one of `triggers`; from there on the text must follow
    /// `grammar`, which starts with the trigger itself.
    pub fn triggered(
        grammar: Grammar,
        vocab: Arc<Vocabulary>,
        triggers: Vec<Trigger>,
        observer: Option<MaskObserver>,
    ) -> Self {
        Self {
            matcher: grammar.matcher,
            vocab,
            mask: None,
            active: triggers.is_empty(),
            triggers,
            text: Vec::new(),
            starts: Vec::new(),
            broken: false,
            observer,
        }
    }

    fn eos_only(&self, logits: &mut [f32]) {
        let eos = self.vocab.eos();
        for (i, l) in logits.iter_mut().enumerate() {
            if !eos.contains(&(i as u32)) {
                *l = f32::NEG_INFINITY;
            }
        }
    }

    /// While waiting: records the token and switches the grammar on if the answer now holds a trigger.
    fn watch(&mut self, token: u32) {
        self.starts.push((self.text.len(), token));
        self.text.extend_from_slice(self.vocab.token_bytes(token));
        let found = self.triggers.iter().find_map(|t| {
            let at = find(&self.text, &t.bytes)?;
            let leading_ok = !t.at_start || self.text[..at].iter().all(|b| b.is_ascii_whitespace());
            leading_ok.then_some(at)
        });
        let Some(at) = found else {
            return;
        };
        // Feed the grammar the answer from the trigger on: the model's own tokens where one starts exactly
        // there (a special token always does), else the text re-tokenized.
        let tokens = match self.starts.iter().position(|&(s, _)| s == at) {
            Some(i) => self.starts[i..].iter().map(|&(_, t)| t).collect(),
            None => self.vocab.tokenize(&self.text[at..]),
        };
        self.active = true;
        if let Err(e) = self.matcher.consume_tokens(&tokens) {
            tracing::debug!(error = %e, "a tool call began in a way its grammar does not allow; left free");
            self.broken = true;
        }
        self.text.clear();
        self.starts.clear();
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

impl TokenConstraint for GrammarConstraint {
    fn prepare(&mut self) {
        if !self.active || self.broken || self.mask.is_some() {
            return;
        }
        let t = Instant::now();
        match self.matcher.compute_mask_or_eos() {
            Ok(m) => self.mask = Some(m),
            Err(e) => {
                tracing::warn!(error = %e, "the grammar failed; ending the answer");
                self.broken = true;
            }
        }
        if let Some(o) = &self.observer {
            o(t.elapsed());
        }
    }

    fn apply(&mut self, logits: &mut [f32]) {
        if !self.active {
            return;
        }
        self.prepare();
        match &self.mask {
            Some(mask) if !self.broken => {
                for (i, l) in logits.iter_mut().enumerate() {
                    if !mask.is_allowed(i as u32) {
                        *l = f32::NEG_INFINITY;
                    }
                }
            }
            // A grammar that held the answer from the start and broke: end it rather than let it run free.
            _ if self.triggers.is_empty() => self.eos_only(logits),
            _ => {}
        }
    }

    fn commit(&mut self, token: u32) {
        self.mask = None;
        if self.broken {
            return;
        }
        if !self.active {
            self.watch(token);
            return;
        }
        if self.vocab.eos().contains(&token) {
            return;
        }
        if let Err(e) = self.matcher.consume_token(token) {
            tracing::warn!(error = %e, "a token outside the grammar was committed");
            self.broken = true;
        }
    }

    fn is_active(&self) -> bool {
        // A triggered grammar that broke lets the rest of the answer go free.
        self.active && (!self.broken || self.triggers.is_empty())
    }
}
