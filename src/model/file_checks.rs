//! Checks of model files before their numbers are used, so a corrupt or edited file is refused
//! with the reason instead of loading into NaN or plausible wrong tokens.
//!
//! GGUF: the structure checks llama.cpp makes before it trusts a file —
//! `general.alignment` is a power of two (candle's reader divides by it, so it is read from the
//! header first), every tensor's element count fits its type's blocks, and the data regions lie
//! in file order at exactly the offsets their sizes give (llama.cpp's rule: each offset equals the
//! previous offset plus the previous tensor's size, padded to the alignment). That rule catches a
//! changed tensor type (its size changes), a moved offset and overlapping regions.
//! Both formats: no block's weights beyond the declared block count, and finite weights.
use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use std::io::{Read, Seek, SeekFrom};

/// GGUF's default alignment when `general.alignment` is absent.
const DEFAULT_ALIGNMENT: u64 = 32;

fn u32_of(r: &mut impl Read) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn u64_of(r: &mut impl Read) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// Bytes of one scalar of GGUF value type `t` (None: string, array or unknown).
fn scalar_size(t: u32) -> Option<u64> {
    match t {
        0 | 1 | 7 => Some(1),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        10..=12 => Some(8),
        _ => None,
    }
}

struct Walker {
    v1: bool,
    len: u64,
}

impl Walker {
    fn length(&self, r: &mut (impl Read + Seek)) -> std::io::Result<u64> {
        if self.v1 {
            u32_of(r).map(u64::from)
        } else {
            u64_of(r)
        }
    }

    /// Skip one value of type `t`, refusing lengths past the end of the file.
    fn skip(&self, r: &mut (impl Read + Seek), t: u32, depth: usize) -> Option<()> {
        if let Some(n) = scalar_size(t) {
            return r.seek(SeekFrom::Current(n as i64)).ok().map(drop);
        }
        match t {
            8 => {
                let n = self.length(r).ok()?;
                let here = r.stream_position().ok()?;
                (n <= self.len.saturating_sub(here)).then_some(())?;
                r.seek(SeekFrom::Current(n as i64)).ok().map(drop)
            }
            9 if depth < 4 => {
                let et = u32_of(r).ok()?;
                let n = self.length(r).ok()?;
                match scalar_size(et) {
                    Some(sz) => {
                        let here = r.stream_position().ok()?;
                        (n.checked_mul(sz)? <= self.len.saturating_sub(here)).then_some(())?;
                        r.seek(SeekFrom::Current((n * sz) as i64)).ok().map(drop)
                    }
                    None => (0..n).try_for_each(|_| self.skip(r, et, depth + 1)),
                }
            }
            _ => None,
        }
    }
}

/// `general.alignment` as the header states it, or None when the header cannot be walked
/// (candle's reader then reports what is wrong) or does not set it.
fn header_alignment(r: &mut (impl Read + Seek), len: u64) -> Option<(u32, i128)> {
    let magic = u32_of(r).ok()?;
    (magic == 0x4655_4747 || magic == 0x4747_5546).then_some(())?;
    let w = Walker { v1: u32_of(r).ok()? == 1, len };
    let _tensors = w.length(r).ok()?;
    let kvs = w.length(r).ok()?;
    for _ in 0..kvs {
        let klen = w.length(r).ok()?;
        let here = r.stream_position().ok()?;
        (klen <= len.saturating_sub(here) && klen < 1 << 16).then_some(())?;
        let mut key = vec![0u8; klen as usize];
        r.read_exact(&mut key).ok()?;
        let t = u32_of(r).ok()?;
        if key == b"general.alignment" {
            let v: i128 = match t {
                0 => i128::from(r.bytes().next()?.ok()?),
                1 => i128::from(r.bytes().next()?.ok()? as i8),
                2 | 3 => {
                    let mut b = [0u8; 2];
                    r.read_exact(&mut b).ok()?;
                    if t == 2 { i128::from(u16::from_le_bytes(b)) } else { i128::from(i16::from_le_bytes(b)) }
                }
                4 | 5 => {
                    let mut b = [0u8; 4];
                    r.read_exact(&mut b).ok()?;
                    if t == 4 { i128::from(u32::from_le_bytes(b)) } else { i128::from(i32::from_le_bytes(b)) }
                }
                _ => return Some((t, -1)),
            };
            return Some((t, v));
        }
        w.skip(r, t, 0)?;
    }
    None
}

/// Checked before candle's reader runs: an alignment it would divide by (0) or misuse.
pub fn check_header(r: &mut (impl Read + Seek)) -> Result<()> {
    let len = r.seek(SeekFrom::End(0))?;
    r.seek(SeekFrom::Start(0))?;
    let found = header_alignment(r, len);
    r.seek(SeekFrom::Start(0))?;
    if let Some((t, a)) = found {
        // candle reads 8-to-32-bit integers only (a u64 would silently become 32).
        if t > 5 {
            bail!("GGUF general.alignment must be an integer of at most 32 bits (value type {t})");
        }
        if a <= 0 || (a as u128).count_ones() != 1 || a > 1 << 20 {
            bail!("GGUF general.alignment = {a} must be a power of two (llama.cpp: 32)");
        }
    }
    Ok(())
}

/// The alignment candle used for the data section (its rule, checked valid by [`check_header`]).
fn alignment(c: &Content) -> u64 {
    match c.metadata.get("general.alignment") {
        Some(Value::U8(v)) => *v as u64,
        Some(Value::U16(v)) => *v as u64,
        Some(Value::U32(v)) => *v as u64,
        Some(Value::I8(v)) if *v > 0 => *v as u64,
        Some(Value::I16(v)) if *v > 0 => *v as u64,
        Some(Value::I32(v)) if *v > 0 => *v as u64,
        _ => DEFAULT_ALIGNMENT,
    }
}

/// Every tensor sized by its type and shape, at the offset llama.cpp's layout gives it, inside
/// a file of `file_len` bytes.
pub fn check_layout(c: &Content, file_len: u64) -> Result<()> {
    let align = alignment(c);
    let mut ts: Vec<(&String, u64, u64)> = Vec::with_capacity(c.tensor_infos.len());
    for (name, ti) in &c.tensor_infos {
        let dims = ti.shape.dims();
        let elems = dims
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d as u64))
            .with_context(|| format!("GGUF tensor {name}: shape {dims:?} overflows"))?;
        let (bs, tsz) = (ti.ggml_dtype.block_size() as u64, ti.ggml_dtype.type_size() as u64);
        if elems % bs != 0 {
            bail!("GGUF tensor {name}: {elems} elements do not fill whole {:?} blocks of {bs}", ti.ggml_dtype);
        }
        let bytes = (elems / bs).checked_mul(tsz).with_context(|| format!("GGUF tensor {name}: size overflows"))?;
        ts.push((name, ti.offset, bytes));
    }
    ts.sort_by_key(|&(n, off, _)| (off, n.clone()));
    let mut expected = 0u64;
    for &(name, off, bytes) in &ts {
        if off % align != 0 {
            bail!("GGUF tensor {name}: offset {off} is not a multiple of the alignment {align}");
        }
        if off != expected {
            let why = if off < expected { "overlaps the tensor before it" } else { "leaves a gap after the tensor before it" };
            bail!("GGUF tensor {name}: data at offset {off} {why} (expected {expected}: a changed type, shape or offset?)");
        }
        let end = c.tensor_data_offset.checked_add(off).and_then(|s| s.checked_add(bytes));
        if end.is_none_or(|e| e > file_len) {
            bail!("GGUF tensor {name}: {bytes} bytes at offset {off} run past the end of the file ({file_len} bytes; truncated?)");
        }
        expected = (off + bytes).div_ceil(align) * align;
    }
    Ok(())
}

/// Blocks that have tensors in the file, against the count the metadata declares.
pub fn check_block_count(names: impl Iterator<Item = String>, block: impl Fn(&str) -> Option<usize>, declared: usize, key: &str) -> Result<()> {
    if let Some(max) = names.filter_map(|n| block(&n)).max() {
        if max >= declared {
            bail!("the file has weights for blocks 0..={max} but {key} = {declared}");
        }
    }
    Ok(())
}

/// `blk.<i>.…` → i (GGUF block tensors).
pub fn gguf_block(name: &str) -> Option<usize> {
    name.strip_prefix("blk.")?.split('.').next()?.parse().ok()
}

/// `model.layers.<i>.…` → i (HF block tensors).
pub fn hf_block(name: &str) -> Option<usize> {
    name.strip_prefix("model.layers.")?.split('.').next()?.parse().ok()
}

/// A weight with NaN or ±Inf would make every logit NaN; summed in f32 (one pass, no copy for
/// f32 weights), a non-finite element makes the sum non-finite.
pub fn check_finite(file: &std::path::Path, name: &str, t: &candle_core::Tensor) -> Result<()> {
    let s = t.to_dtype(candle_core::DType::F32)?.sum_all()?.to_scalar::<f32>()?;
    if !s.is_finite() {
        bail!("{}: tensor {name} has NaN or infinite values", file.display());
    }
    Ok(())
}

/// A short forward pass must give finite logits: finite weights can still overflow (a scale
/// edited to 6e4 in a quantised block), and a model that prints NaN must not load as fine.
pub fn check_runs(source: &std::path::Path, model: &super::Llama) -> Result<()> {
    let v = model.cfg.vocab_size as u32;
    let ids = vec![[1u32, 50, 300, 3].map(|i| i % v).to_vec()];
    let out = model.forward(&ids, super::Fwd { logits: super::LogitsAt::All, ..Default::default() })?;
    let logits = out.logits.context("the test forward gave no logits")?;
    let s = logits.to_dtype(candle_core::DType::F32)?.abs()?.sum_all()?.to_scalar::<f32>()?;
    if !s.is_finite() {
        bail!("{}: the weights give non-finite logits on a 4-token test prompt (values out of range: a corrupt file?)", source.display());
    }
    Ok(())
}
