//! Tokenizer: HF `tokenizer.json` when present, otherwise a byte-level BPE rebuilt from GGUF
//! metadata. The GGUF path must give the same ids as transformers (no prefix space for SmolLM2).
use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file;
use std::path::Path;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// llama.cpp's `qwen2` pre-tokenizer regex (= Qwen2's tokenizer.json `Split` pattern).
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

pub struct Tok {
    inner: Tokenizer,
    pub bos: Option<u32>,
    pub eos: Vec<u32>,
    /// Whether a BOS token is prepended on encode (false for SmolLM2, as in its GGUF/HF files).
    pub add_bos: bool,
}

impl Tok {
    /// `bos`/`eos`: the model config's special ids (the tokenizer layer knows no model types).
    pub fn from_file(path: &Path, bos: Option<u32>, eos: &[u32]) -> Result<Self> {
        let inner = Tokenizer::from_file(path).map_err(|e| anyhow!("reading {}: {e}", path.display()))?;
        let mut eos = eos.to_vec();
        // tokenizer_config.json names the chat end token for instruct models; honour it too.
        if let Some(dir) = path.parent() {
            if let Ok(text) = std::fs::read_to_string(dir.join("tokenizer_config.json")) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                    if let Some(id) = v.get("eos_token").and_then(|e| e.as_str()).and_then(|s| inner.token_to_id(s)) {
                        if !eos.contains(&id) {
                            eos.push(id);
                        }
                    }
                }
            }
        }
        Ok(Self { inner, bos, eos, add_bos: false })
    }

    /// Wrap an in-memory tokenizer (e.g. one built for a project-trained model).
    pub fn from_tokenizer(inner: Tokenizer, bos: Option<u32>, eos: Vec<u32>) -> Self {
        Self { inner, bos, eos, add_bos: false }
    }

    pub fn from_gguf(content: &gguf_file::Content, bos: Option<u32>, eos: &[u32]) -> Result<Self> {
        let md = &content.metadata;
        let model = md.get("tokenizer.ggml.model").and_then(|v| v.to_string().ok()).cloned().unwrap_or_default();
        if model != "gpt2" {
            bail!("GGUF tokenizer model {model:?} is not supported (byte-level BPE \"gpt2\" only)");
        }
        let tokens = md
            .get("tokenizer.ggml.tokens")
            .context("GGUF has no tokenizer.ggml.tokens")?
            .to_vec()?
            .iter()
            .map(|v| v.to_string().cloned())
            .collect::<candle_core::Result<Vec<String>>>()?;
        let merges = match md.get("tokenizer.ggml.merges") {
            Some(m) => m
                .to_vec()?
                .iter()
                .map(|v| {
                    let s = v.to_string()?;
                    s.split_once(' ')
                        .map(|(a, b)| (a.to_string(), b.to_string()))
                        .ok_or_else(|| candle_core::Error::Msg(format!("bad merge {s:?}")))
                })
                .collect::<candle_core::Result<Vec<_>>>()?,
            None => vec![],
        };
        let types: Vec<i32> = match md.get("tokenizer.ggml.token_type") {
            Some(t) => t.to_vec()?.iter().map(|v| v.to_i32().unwrap_or(1)).collect(),
            None => vec![1; tokens.len()],
        };
        let vocab: ahash::AHashMap<String, u32> = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| anyhow!("building BPE from GGUF: {e}"))?;
        let mut inner = Tokenizer::new(bpe);
        let pre = md.get("tokenizer.ggml.pre").and_then(|v| v.to_string().ok()).cloned().unwrap_or_default();
        match pre.as_str() {
            // Qwen2's own split regex (single digits, letters with one leading non-letter, ...)
            // then byte-level without a regex of its own: what transformers builds for `qwen2`;
            // Llama 3's differs only in grouping up to three digits.
            "qwen2" | "llama-bpe" => {
                let re = if pre == "qwen2" { QWEN2_SPLIT.to_string() } else { QWEN2_SPLIT.replace(r"\p{N}|", r"\p{N}{1,3}|") };
                let split = Split::new(SplitPattern::Regex(re), SplitDelimiterBehavior::Isolated, false)
                    .map_err(|e| anyhow!("building the qwen2 pre-tokenizer: {e}"))?;
                inner.with_pre_tokenizer(Some(Sequence::new(vec![
                    PreTokenizerWrapper::Split(split),
                    PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, false)),
                ])));
            }
            // Byte-level, GPT-2 regex, and *no* prefix space: what transformers builds for
            // `smollm` (and the GPT-2 default).
            "smollm" | "gpt2" | "gpt-2" | "default" | "" => {
                inner.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
            }
            other => bail!("GGUF pre-tokenizer {other:?} is not supported (qwen2, llama-bpe, smollm, gpt2)"),
        }
        inner.with_decoder(Some(ByteLevelDecoder::new(true, true, true)));
        // Control tokens (type 3) are matched whole, never split, as HF's added special tokens.
        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, &ty)| ty == 3)
            .map(|(t, _)| AddedToken::from(t.clone(), true))
            .collect();
        inner.add_special_tokens(specials).map_err(|e| anyhow!("adding special tokens: {e}"))?;
        // User-defined tokens (type 4, e.g. Qwen's `<tool_call>`) are matched whole too, as HF's
        // non-special added tokens.
        let user: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, &ty)| ty == 4)
            .map(|(t, _)| AddedToken::from(t.clone(), false))
            .collect();
        if !user.is_empty() {
            inner.add_tokens(user).map_err(|e| anyhow!("adding user-defined tokens: {e}"))?;
        }
        let add_bos = md.get("tokenizer.ggml.add_bos_token").and_then(|v| v.to_bool().ok()).unwrap_or(false);
        Ok(Self { inner, bos, eos: eos.to_vec(), add_bos })
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| anyhow!("tokenizing: {e}"))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if self.add_bos {
            if let Some(b) = self.bos {
                ids.push(b);
            }
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// The id text outside the vocabulary maps to, when the model has one (word-level, WordPiece,
    /// BPE with an unk token; byte-level BPE has none: every byte is a token).
    pub fn unk_id(&self) -> Option<u32> {
        use tokenizers::models::ModelWrapper as M;
        let name = match self.inner.get_model() {
            M::WordLevel(w) => Some(w.unk_token.clone()),
            M::WordPiece(w) => Some(w.unk_token.clone()),
            M::BPE(b) => b.unk_token.clone(),
            M::Unigram(_) => None,
        }?;
        self.inner.token_to_id(&name)
    }

    /// [`Tok::encode`] for answer words (label words, task labels): a word outside the vocabulary
    /// is an error naming it, instead of silently becoming the unknown token (every unknown word
    /// would then be the same answer). `what` names the key or file line in the error.
    pub fn encode_known(&self, text: &str, what: &str) -> Result<Vec<u32>> {
        let ids = self.encode(text)?;
        if let Some(unk) = self.unk_id() {
            let literal = self.inner.id_to_token(unk).is_some_and(|u| text.trim() == u);
            if !literal && ids.contains(&unk) {
                bail!("{what} {text:?} is not in the model's vocabulary (it tokenises to the unknown token {:?})", self.token_str(unk));
            }
        }
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(|e| anyhow!("decoding: {e}"))
    }

    /// The text of one token, for labels in tables and plots.
    pub fn token_str(&self, id: u32) -> String {
        self.decode(&[id]).unwrap_or_else(|_| format!("<{id}>"))
    }

    pub fn token_to_id(&self, s: &str) -> Option<u32> {
        self.inner.token_to_id(s)
    }

    /// Write a HF `tokenizer.json` (so merged checkpoints load anywhere, GGUF-built ones too).
    pub fn save(&self, path: &Path) -> Result<()> {
        self.inner.save(path, false).map_err(|e| anyhow!("writing {}: {e}", path.display()))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

