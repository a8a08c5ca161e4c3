//! A GGUF reader in Rust that checks a model file's structure before llama.cpp
//! opens it: header, counts, every metadata value, every tensor's type, shape
//! and data range. llama.cpp's own loader aborts on some malformed files; this
//! refuses them with a message naming the problem.

use std::collections::HashMap;
use std::io::{BufReader, Read};
use std::path::Path;

/// Far beyond any real model; a larger count means a corrupt file.
const MAX_TENSORS: u64 = 1 << 20;
/// Far beyond any real model's metadata entries.
const MAX_KEYS: u64 = 1 << 20;
/// Longest key or string value accepted (chat templates are a few KiB).
const MAX_STRING: u64 = 16 << 20;
/// Most elements of one metadata array (vocabularies are ~150k entries).
const MAX_ARRAY: u64 = 1 << 24;
/// ggml's limit on tensor dimensions.
const MAX_DIMS: u32 = 4;

/// A metadata value, as much of it as the checks need.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// Any unsigned or signed integer.
    Int(i128),
    /// A float.
    Float(f64),
    /// A boolean.
    Bool(bool),
    /// A string.
    Str(String),
    /// An array: element type and length (elements are checked, not kept).
    Array {
        /// GGUF type id of the elements.
        element: u32,
        /// Number of elements.
        len: u64,
    },
}

/// One tensor's entry in the header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    /// Tensor name.
    pub name: String,
    /// Shape, innermost first.
    pub dims: Vec<u64>,
    /// ggml type id.
    pub ggml_type: u32,
    /// Offset of its data from the start of the data section.
    pub offset: u64,
    /// Bytes of data.
    pub bytes: u64,
}

/// A checked GGUF header.
#[derive(Clone, Debug)]
pub struct Gguf {
    /// Format version (2 or 3).
    pub version: u32,
    /// Metadata by key.
    pub meta: HashMap<String, Value>,
    /// Tensors in file order.
    pub tensors: Vec<TensorInfo>,
    /// Where the header's parts end and the data begins.
    pub layout: Layout,
}

/// Byte offsets of a GGUF file's sections, for rewriting a header while the
/// tensor data is copied as it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// End of the last metadata entry (the tensor table starts here).
    pub kv_end: u64,
    /// End of the tensor table.
    pub header_end: u64,
    /// Start of the tensor data (`header_end` rounded up to `alignment`).
    pub data_start: u64,
    /// `general.alignment`, else 32.
    pub alignment: u64,
}

impl Gguf {
    /// A string metadata value.
    pub fn string(&self, key: &str) -> Option<&str> {
        match self.meta.get(key)? {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The tensor called `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// An integer metadata value.
    pub fn int(&self, key: &str) -> Option<i128> {
        match self.meta.get(key)? {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }
}

/// Counts bytes read so that lengths can be checked against what is left.
struct Reader<R> {
    inner: R,
    pos: u64,
    len: u64,
}

impl<R: Read> Reader<R> {
    fn bytes<const N: usize>(&mut self, what: &str) -> Result<[u8; N], String> {
        let mut buf = [0u8; N];
        self.inner
            .read_exact(&mut buf)
            .map_err(|_| format!("file ends inside {what} at byte {}", self.pos))?;
        self.pos += N as u64;
        Ok(buf)
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        self.bytes::<4>(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64, String> {
        self.bytes::<8>(what).map(u64::from_le_bytes)
    }

    fn remaining(&self) -> u64 {
        self.len.saturating_sub(self.pos)
    }

    fn string(&mut self, what: &str) -> Result<String, String> {
        let len = self.u64(what)?;
        if len > MAX_STRING || len > self.remaining() {
            return Err(format!("{what} claims {len} bytes at byte {}", self.pos));
        }
        let mut buf = vec![0u8; len as usize];
        self.inner
            .read_exact(&mut buf)
            .map_err(|_| format!("file ends inside {what}"))?;
        self.pos += len;
        String::from_utf8(buf).map_err(|_| format!("{what} is not UTF-8"))
    }

    fn skip(&mut self, n: u64, what: &str) -> Result<(), String> {
        if n > self.remaining() {
            return Err(format!("file ends inside {what}"));
        }
        let copied = std::io::copy(&mut (&mut self.inner).take(n), &mut std::io::sink())
            .map_err(|e| format!("cannot read {what}: {e}"))?;
        if copied != n {
            return Err(format!("file ends inside {what}"));
        }
        self.pos += n;
        Ok(())
    }

    /// A scalar of GGUF type `t`, or `None` for strings and arrays.
    fn scalar(&mut self, t: u32, what: &str) -> Result<Option<Value>, String> {
        Ok(Some(match t {
            0 => Value::Int(i128::from(self.bytes::<1>(what)?[0])),
            1 => Value::Int(i128::from(self.bytes::<1>(what)?[0] as i8)),
            2 => Value::Int(i128::from(u16::from_le_bytes(self.bytes(what)?))),
            3 => Value::Int(i128::from(i16::from_le_bytes(self.bytes(what)?))),
            4 => Value::Int(i128::from(self.u32(what)?)),
            5 => Value::Int(i128::from(i32::from_le_bytes(self.bytes(what)?))),
            6 => Value::Float(f64::from(f32::from_le_bytes(self.bytes(what)?))),
            7 => match self.bytes::<1>(what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(format!("{what} is a boolean of value {b}")),
            },
            10 => Value::Int(i128::from(self.u64(what)?)),
            11 => Value::Int(i128::from(i64::from_le_bytes(self.bytes(what)?))),
            12 => Value::Float(f64::from_le_bytes(self.bytes(what)?)),
            _ => return Ok(None),
        }))
    }

    fn value(&mut self, t: u32, key: &str) -> Result<Value, String> {
        if let Some(v) = self.scalar(t, key)? {
            return Ok(v);
        }
        match t {
            8 => Ok(Value::Str(self.string(key)?)),
            9 => {
                let element = self.u32(key)?;
                let len = self.u64(key)?;
                if len > MAX_ARRAY {
                    return Err(format!("{key} claims an array of {len} elements"));
                }
                match element {
                    8 => {
                        for _ in 0..len {
                            self.string(key)?;
                        }
                    }
                    9 => return Err(format!("{key} is an array of arrays")),
                    _ => {
                        let size = scalar_size(element).ok_or_else(|| {
                            format!("{key} has elements of unknown type {element}")
                        })?;
                        self.skip(len * size, key)?;
                    }
                }
                Ok(Value::Array { element, len })
            }
            other => Err(format!("{key} has unknown type {other}")),
        }
    }
}

fn scalar_size(t: u32) -> Option<u64> {
    match t {
        0 | 1 | 7 => Some(1),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        10..=12 => Some(8),
        _ => None,
    }
}

/// ggml's `(block size, bytes per block)` by type id, as `ggml_blck_size` and
/// `ggml_type_size` give them in the llama.cpp this service links (ggml
/// 0.26); `(0, 0)` for ids whose support was removed. The engine crate's
/// `ggml_types_match_the_linked_ggml` test checks every entry and the count
/// against that ggml, so a llama.cpp update that adds or changes a type fails
/// there instead of letting a file through that llama.cpp then reads wrong.
pub const GGML_TYPES: [(u64, u64); 43] = [
    (1, 4),     // F32
    (1, 2),     // F16
    (32, 18),   // Q4_0
    (32, 20),   // Q4_1
    (0, 0),     // Q4_2, removed
    (0, 0),     // Q4_3, removed
    (32, 22),   // Q5_0
    (32, 24),   // Q5_1
    (32, 34),   // Q8_0
    (32, 36),   // Q8_1
    (256, 84),  // Q2_K
    (256, 110), // Q3_K
    (256, 144), // Q4_K
    (256, 176), // Q5_K
    (256, 210), // Q6_K
    (256, 292), // Q8_K
    (256, 66),  // IQ2_XXS
    (256, 74),  // IQ2_XS
    (256, 98),  // IQ3_XXS
    (256, 50),  // IQ1_S
    (32, 18),   // IQ4_NL
    (256, 110), // IQ3_S
    (256, 82),  // IQ2_S
    (256, 136), // IQ4_XS
    (1, 1),     // I8
    (1, 2),     // I16
    (1, 4),     // I32
    (1, 8),     // I64
    (1, 8),     // F64
    (256, 56),  // IQ1_M
    (1, 2),     // BF16
    (0, 0),     // Q4_0_4_4, removed
    (0, 0),     // Q4_0_4_8, removed
    (0, 0),     // Q4_0_8_8, removed
    (256, 54),  // TQ1_0
    (256, 66),  // TQ2_0
    (0, 0),     // IQ4_NL_4_4, removed
    (0, 0),     // IQ4_NL_4_8, removed
    (0, 0),     // IQ4_NL_8_8, removed
    (32, 17),   // MXFP4
    (64, 36),   // NVFP4
    (128, 18),  // Q1_0
    (64, 18),   // Q2_0
];

/// Bytes of a tensor of `ggml_type` and shape `dims`, if the type is one this
/// llama.cpp knows and the shape fits its blocks.
fn tensor_bytes(ggml_type: u32, dims: &[u64]) -> Result<u64, String> {
    let Some(&(block, size)) = GGML_TYPES.get(ggml_type as usize) else {
        return Err(format!("unknown tensor type {ggml_type}"));
    };
    if block == 0 || size == 0 {
        return Err(format!("tensor type {ggml_type} is no longer supported"));
    }
    let inner = dims.first().copied().unwrap_or(1);
    if inner % block != 0 {
        return Err(format!(
            "row of {inner} elements is not a whole number of type-{ggml_type} blocks of {block}"
        ));
    }
    dims.iter()
        .skip(1)
        .try_fold((inner / block).checked_mul(size), |acc, &d| {
            Some(acc.and_then(|a| a.checked_mul(d)))
        })
        .flatten()
        .ok_or_else(|| format!("tensor of shape {dims:?} overflows"))
}

/// Reads and checks the GGUF header of `bytes` (a whole file or its start,
/// with `file_len` the full length).
pub fn parse(reader: impl Read, file_len: u64) -> Result<Gguf, String> {
    let mut r = Reader {
        inner: reader,
        pos: 0,
        len: file_len,
    };
    let magic = r
        .bytes::<4>("the magic")
        .map_err(|_| "file is too short to be a GGUF".to_string())?;
    if &magic != b"GGUF" {
        return Err("not a GGUF file (bad magic)".into());
    }
    let version = r.u32("the version")?;
    if !(2..=3).contains(&version) {
        return Err(format!("unsupported GGUF version {version}"));
    }
    let n_tensors = r.u64("the tensor count")?;
    let n_kv = r.u64("the metadata count")?;
    if n_tensors > MAX_TENSORS || n_kv > MAX_KEYS {
        return Err(format!(
            "implausible counts: {n_tensors} tensors, {n_kv} metadata entries"
        ));
    }
    let mut meta = HashMap::new();
    for i in 0..n_kv {
        let key = r.string(&format!("metadata key {i}"))?;
        let t = r.u32(&key)?;
        let value = r.value(t, &key)?;
        if meta.insert(key.clone(), value).is_some() {
            return Err(format!("metadata key {key} appears twice"));
        }
    }
    let kv_end = r.pos;
    let mut tensors = Vec::with_capacity(n_tensors.min(4096) as usize);
    for i in 0..n_tensors {
        let name = r.string(&format!("tensor name {i}"))?;
        let n_dims = r.u32(&name)?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(format!("tensor {name} has {n_dims} dimensions"));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            let d = r.u64(&name)?;
            if d == 0 || d > i64::MAX as u64 {
                return Err(format!("tensor {name} has a dimension of {d}"));
            }
            dims.push(d);
        }
        let ggml_type = r.u32(&name)?;
        let offset = r.u64(&name)?;
        let bytes = tensor_bytes(ggml_type, &dims).map_err(|e| format!("tensor {name}: {e}"))?;
        tensors.push(TensorInfo {
            name,
            dims,
            ggml_type,
            offset,
            bytes,
        });
    }
    let alignment = match meta.get("general.alignment") {
        None => 32,
        Some(Value::Int(a)) if *a > 0 && (*a as u64).is_power_of_two() && *a <= 1 << 20 => {
            *a as u64
        }
        Some(other) => return Err(format!("general.alignment is {other:?}")),
    };
    let header_end = r.pos;
    let data_start = header_end.div_ceil(alignment) * alignment;
    let data_len = file_len.saturating_sub(data_start);
    for t in &tensors {
        if t.offset % alignment != 0 {
            return Err(format!("tensor {} is not aligned to {alignment}", t.name));
        }
        if t.offset
            .checked_add(t.bytes)
            .is_none_or(|end| end > data_len)
        {
            return Err(format!(
                "tensor {} ends beyond the file: the file is truncated or corrupt",
                t.name
            ));
        }
    }
    Ok(Gguf {
        version,
        meta,
        tensors,
        layout: Layout {
            kv_end,
            header_end,
            data_start,
            alignment,
        },
    })
}

/// Appends a GGUF string (its length as a u64, then its bytes), for the few
/// places that write headers.
pub fn push_string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

/// Reads and checks the GGUF file at `path`.
pub fn read(path: &Path) -> Result<Gguf, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("cannot open: {e}"))?;
    let len = file
        .metadata()
        .map_err(|e| format!("cannot stat: {e}"))?
        .len();
    parse(BufReader::with_capacity(1 << 16, file), len)
}

/// Checks what the engine needs of a language model beyond the structure.
pub fn check_language_model(gguf: &Gguf) -> Result<(), String> {
    let arch = gguf
        .string("general.architecture")
        .ok_or("missing general.architecture")?;
    for key in ["block_count", "context_length", "embedding_length"] {
        let full = format!("{arch}.{key}");
        match gguf.int(&full) {
            Some(v) if v > 0 => {}
            Some(v) => return Err(format!("{full} is {v}")),
            None => return Err(format!("missing {full}")),
        }
    }
    match gguf.meta.get("tokenizer.ggml.tokens") {
        Some(Value::Array { element: 8, len }) if *len > 0 => {}
        Some(_) => return Err("tokenizer.ggml.tokens is not a list of strings".into()),
        None => return Err("missing tokenizer.ggml.tokens: no vocabulary".into()),
    }
    if gguf.string("tokenizer.ggml.model").is_none() {
        return Err("missing tokenizer.ggml.model".into());
    }
    if gguf.tensors.is_empty() {
        return Err("has no tensors".into());
    }
    if gguf.string("clip.projector_type").is_some() {
        return Err("this is an mmproj (vision encoder) file, not a language model".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::push_string as string;

    /// A minimal file: one string key, one u32 key, one tensor of 4×2
    /// elements of `ggml_type` (valid for F32 = 0).
    fn file(ggml_type: u32) -> Vec<u8> {
        let mut f = b"GGUF".to_vec();
        f.extend(3u32.to_le_bytes());
        f.extend(1u64.to_le_bytes());
        f.extend(2u64.to_le_bytes());
        string(&mut f, "general.architecture");
        f.extend(8u32.to_le_bytes());
        string(&mut f, "llama");
        string(&mut f, "llama.block_count");
        f.extend(4u32.to_le_bytes());
        f.extend(2u32.to_le_bytes());
        string(&mut f, "w");
        f.extend(2u32.to_le_bytes());
        f.extend(4u64.to_le_bytes());
        f.extend(2u64.to_le_bytes());
        f.extend(ggml_type.to_le_bytes());
        f.extend(0u64.to_le_bytes());
        while !f.len().is_multiple_of(32) {
            f.push(0);
        }
        f.extend([0u8; 32]);
        f
    }

    fn check(bytes: &[u8]) -> Result<Gguf, String> {
        parse(bytes, bytes.len() as u64)
    }

    #[test]
    fn reads_a_valid_header() {
        let g = check(&file(0)).unwrap();
        assert_eq!(g.string("general.architecture"), Some("llama"));
        assert_eq!(g.int("llama.block_count"), Some(2));
        assert_eq!(g.tensors[0].bytes, 32);
    }

    #[test]
    fn refuses_every_truncation() {
        let f = file(0);
        for cut in 0..f.len() {
            assert!(check(&f[..cut]).is_err(), "accepted a file cut at {cut}");
        }
    }

    #[test]
    fn refuses_lying_counts_and_lengths() {
        let mut f = file(0);
        f[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(check(&f).unwrap_err().contains("implausible"));
        let mut f = file(0);
        f[24..32].copy_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(check(&f).unwrap_err().contains("claims"));
    }

    #[test]
    fn refuses_unknown_types_and_partial_blocks() {
        assert!(check(&file(9999))
            .unwrap_err()
            .contains("unknown tensor type"));
        // Q8_0 blocks hold 32 elements; a row of 4 is not a whole block.
        assert!(check(&file(8)).unwrap_err().contains("blocks"));
    }
}
