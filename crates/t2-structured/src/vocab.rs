//! The model's vocabulary in llguidance's terms and the grammar compiler over it.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use t2_model::T2Tokenizer;
use toktrie::{ApproximateTokEnv, TokEnv, TokRxInfo, TokTrie};

use crate::{Result, StructuredError};

/// A grammar compiled for this vocabulary, ready to hold one answer ([`Grammar::fresh`] gives another
/// answer its own copy).
pub struct Grammar {
    pub(crate) matcher: Matcher,
}

impl Grammar {
    /// An independent copy in the same (initial) state.
    pub fn fresh(&self) -> Self {
        Self {
            matcher: self.matcher.deep_clone(),
        }
    }
}

/// Built once per model: a few tens of milliseconds for a 50k vocabulary.
pub struct Vocabulary {
    env: TokEnv,
    factory: ParserFactory,
    eos: Vec<u32>,
    size: usize,
    /// Special tokens by their text (`<|python_tag|>`, `[TOOL_CALLS]`): a grammar names them by id.
    specials: std::collections::HashMap<String, u32>,
}

impl Vocabulary {
    pub fn new(tok: &T2Tokenizer) -> Result<Self> {
        let size = tok.vocab_size();
        // llguidance matches grammars on bytes; special tokens (chat markers, end of turn) are marked so
        // that no literal text in a grammar can produce them.
        let words: Vec<Vec<u8>> = (0..size as u32)
            .map(|id| {
                let bytes = tok.token_bytes(id);
                if tok.is_special(id) {
                    let mut marked = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                    marked.extend(bytes);
                    marked
                } else {
                    bytes
                }
            })
            .collect();
        let specials = (0..size as u32)
            .filter(|&id| tok.is_special(id))
            .map(|id| {
                (
                    String::from_utf8_lossy(&tok.token_bytes(id)).into_owned(),
                    id,
                )
            })
            .collect();
        let eos = tok.eos.clone();
        let first_eos = *eos.first().ok_or_else(|| {
            StructuredError::Invalid("the model has no end-of-sequence token".into())
        })?;
        let trie =
            TokTrie::from(&TokRxInfo::new(size as u32, first_eos), &words).with_eos_tokens(&eos);
        let env: TokEnv = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory =
            ParserFactory::new_simple(&env).map_err(|e| StructuredError::Grammar(e.to_string()))?;
        factory.quiet();
        Ok(Self {
            env,
            factory,
            eos,
            size,
            specials,
        })
    }

    /// Compiles a grammar (JSON schema, Lark or regex). Errors name what is wrong with it.
    pub fn compile(&self, grammar: TopLevelGrammar) -> Result<Grammar> {
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| StructuredError::Grammar(e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(StructuredError::Grammar(e));
        }
        Ok(Grammar { matcher })
    }

    /// Tokens for text, as the grammar's matcher reads them (greedy over the vocabulary: llguidance works
    /// on bytes, so any tokenization of the same text is as good).
    pub fn tokenize(&self, bytes: &[u8]) -> Vec<u32> {
        self.env.tokenize_bytes(bytes)
    }

    /// A token's bytes as the grammar sees them (special tokens start with 0xFF).
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.env.tok_trie().token(id)
    }

    /// The id of a special token written as `text`, if the vocabulary has one.
    pub fn special(&self, text: &str) -> Option<u32> {
        self.specials.get(text).copied()
    }

    pub fn eos(&self) -> &[u32] {
        &self.eos
    }

    pub fn size(&self) -> usize {
        self.size
    }
}
