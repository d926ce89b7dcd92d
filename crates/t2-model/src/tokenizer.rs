//! The tokenizer, built either from GGUF metadata (tokens, merges, token types) or from an HF
//! `tokenizer.json`. Byte-level BPE only: that covers Llama 3, Qwen2, SmolLM and GPT-2 style vocabularies.

use candle_core::quantized::gguf_file;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::error::{ModelError, Result};

// Splitting rules of the Llama 3 and Qwen2 vocabularies (as published with those models).
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

// GGUF token types (llama.cpp's llama_token_type).
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

pub struct T2Tokenizer {
    inner: Tokenizer,
    pub bos: Option<u32>,
    /// Tokens that end generation: the model's EOS plus the chat turn terminator when it differs.
    pub eos: Vec<u32>,
    pub add_bos: bool,
}

fn tok_err(e: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer(e.to_string())
}

impl T2Tokenizer {
    /// The tokenizer of a GGUF file alone (reads the header, not the weights).
    pub fn from_gguf_path(path: &std::path::Path) -> Result<Self> {
        let mut file = std::fs::File::open(path).map_err(|e| ModelError::Io {
            path: path.into(),
            source: e,
        })?;
        let content = gguf_file::Content::read(&mut file)
            .map_err(|e| tok_err(format!("{}: {e}", path.display())))?;
        Self::from_gguf(&content)
    }

    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self> {
        let md = &content.metadata;
        let get = |k: &str| {
            md.get(k)
                .ok_or_else(|| tok_err(format!("GGUF metadata lacks {k}")))
        };
        let model = get("tokenizer.ggml.model")?.to_string().map_err(tok_err)?;
        if model != "gpt2" {
            return Err(ModelError::Unsupported(format!(
                "GGUF tokenizer model '{model}' (only byte-level BPE, 'gpt2', is supported)"
            )));
        }
        let tokens: Vec<String> = get("tokenizer.ggml.tokens")?
            .to_vec()
            .map_err(tok_err)?
            .iter()
            .map(|v| v.to_string().cloned().map_err(tok_err))
            .collect::<Result<_>>()?;
        let merges: Vec<(String, String)> = get("tokenizer.ggml.merges")?
            .to_vec()
            .map_err(tok_err)?
            .iter()
            .map(|v| {
                let s = v.to_string().map_err(tok_err)?;
                let (a, b) = s
                    .split_once(' ')
                    .ok_or_else(|| tok_err(format!("bad merge '{s}'")))?;
                Ok((a.to_string(), b.to_string()))
            })
            .collect::<Result<_>>()?;
        let types: Vec<i32> = match md.get("tokenizer.ggml.token_type") {
            Some(v) => v
                .to_vec()
                .map_err(tok_err)?
                .iter()
                .map(|t| t.to_i32().map_err(tok_err))
                .collect::<Result<_>>()?,
            None => vec![1; tokens.len()],
        };
        let pre = md
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok().cloned())
            .unwrap_or_else(|| "default".to_string());
        let u32_of = |k: &str| md.get(k).and_then(|v| v.to_u32().ok());
        let bos = u32_of("tokenizer.ggml.bos_token_id");
        let eos = u32_of("tokenizer.ggml.eos_token_id")
            .ok_or_else(|| tok_err("GGUF metadata lacks tokenizer.ggml.eos_token_id"))?;
        let add_bos = md
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(false);

        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(tok_err)?;
        let mut inner = Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(pre_tokenizer_for(&pre)?));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        let (special, user): (Vec<_>, Vec<_>) = tokens
            .iter()
            .zip(&types)
            .filter(|(_, t)| **t == TOKEN_TYPE_CONTROL || **t == TOKEN_TYPE_USER_DEFINED)
            .partition(|(_, t)| **t == TOKEN_TYPE_CONTROL);
        let added = |v: Vec<(&String, &i32)>, special: bool| -> Vec<AddedToken> {
            v.into_iter()
                .map(|(s, _)| AddedToken::from(s.clone(), special))
                .collect()
        };
        inner.add_special_tokens(&added(special, true));
        inner.add_tokens(&added(user, false));

        let eos_ids = with_turn_terminators(&inner, vec![eos]);
        Ok(Self {
            inner,
            bos,
            eos: eos_ids,
            add_bos,
        })
    }

    /// Loads an HF `tokenizer.json`; `bos`/`eos` come from the checkpoint's config files.
    pub fn from_hf_file(
        path: &std::path::Path,
        bos: Option<u32>,
        eos: Vec<u32>,
        add_bos: bool,
    ) -> Result<Self> {
        let inner =
            Tokenizer::from_file(path).map_err(|e| tok_err(format!("{}: {e}", path.display())))?;
        let eos = with_turn_terminators(&inner, eos);
        if eos.is_empty() {
            return Err(tok_err(
                "no end-of-sequence token known for this checkpoint",
            ));
        }
        Ok(Self {
            inner,
            bos,
            eos,
            add_bos,
        })
    }

    /// Encodes text; special tokens written in the text (e.g. `<|im_start|>`) become their ids, as a chat
    /// template's output needs.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(tok_err)?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if self.add_bos {
            if let Some(b) = self.bos {
                ids.push(b);
            }
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Encodes text that continues an already encoded sequence: never a beginning-of-sequence token.
    pub fn encode_continuation(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(tok_err)?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(tok_err)
    }

    /// The raw bytes one token stands for (a token can be part of a multi-byte character, which `decode`
    /// of that token alone would turn into U+FFFD). Handles byte-level BPE vocabularies (GPT-2's byte
    /// alphabet), SentencePiece byte tokens `<0xHH>` and its `▁` space marker; special tokens give their
    /// text.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let Some(tok) = self.inner.id_to_token(id) else {
            return Vec::new();
        };
        if let Some(hex) = tok.strip_prefix("<0x").and_then(|t| t.strip_suffix('>')) {
            if let Ok(b) = u8::from_str_radix(hex, 16) {
                return vec![b];
            }
        }
        let byte_level: Option<Vec<u8>> = tok.chars().map(byte_level_char).collect();
        match byte_level {
            Some(bytes) if !self.is_special(id) => bytes,
            _ => tok.replace('\u{2581}', " ").into_bytes(),
        }
    }

    /// Whether the token is a special (control) token: chat markers, end of turn.
    pub fn is_special(&self, id: u32) -> bool {
        self.inner
            .get_added_tokens_decoder()
            .get(&id)
            .is_some_and(|t| t.special)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn is_eos(&self, id: u32) -> bool {
        self.eos.contains(&id)
    }

    /// Writes an HF `tokenizer.json` (used to export a checkpoint folder).
    pub fn save(&self, path: &std::path::Path) -> Result<()> {
        self.inner.save(path, false).map_err(tok_err)
    }
}

/// Chat models end a turn with their own token, which must stop generation like EOS does.
fn with_turn_terminators(inner: &Tokenizer, mut eos: Vec<u32>) -> Vec<u32> {
    for extra in ["<|im_end|>", "<|eot_id|>", "<|end|>"] {
        if let Some(id) = inner.token_to_id(extra) {
            if !eos.contains(&id) {
                eos.push(id);
            }
        }
    }
    eos
}

fn pre_tokenizer_for(pre: &str) -> Result<PreTokenizerWrapper> {
    let split = |pattern: &str| -> Result<PreTokenizerWrapper> {
        Ok(Split::new(
            SplitPattern::Regex(pattern.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(tok_err)?
        .into())
    };
    Ok(match pre {
        // SmolLM splits every digit, then applies the GPT-2 rules.
        "smollm" => Sequence::new(vec![
            Digits::new(true).into(),
            ByteLevel::new(false, true, true).into(),
        ])
        .into(),
        "default" | "gpt2" | "gpt-2" => ByteLevel::new(false, true, true).into(),
        "llama-bpe" | "llama3" | "smaug-bpe" => Sequence::new(vec![
            split(LLAMA3_PATTERN)?,
            ByteLevel::new(false, true, false).into(),
        ])
        .into(),
        "qwen2" => Sequence::new(vec![
            split(QWEN2_PATTERN)?,
            ByteLevel::new(false, true, false).into(),
        ])
        .into(),
        other => {
            return Err(ModelError::Unsupported(format!(
                "GGUF pre-tokenizer '{other}' (supported: smollm, gpt2, llama-bpe, qwen2)"
            )))
        }
    })
}

/// GPT-2's byte-level alphabet, inverted: printable bytes stand for themselves, the other 68 bytes were
/// shifted to U+0100 and up in byte order.
fn byte_level_char(c: char) -> Option<u8> {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let u = c as u32;
    if u < 256 {
        return printable(u).then_some(u as u8);
    }
    let n = (u - 256) as usize;
    (0u32..256)
        .filter(|&b| !printable(b))
        .nth(n)
        .map(|b| b as u8)
}
