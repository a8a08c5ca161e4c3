//! Constrained decoding: a request's `response_format` (JSON Schema, any
//! JSON object, regex, GBNF grammar or a choice of strings) compiled by
//! llguidance against the model's vocabulary, and each sequence's matcher,
//! which forbids every token the format does not allow next.
//!
//! The vocabulary's token trie is built once per model, on the first request
//! with a format ([`FormatCompiler`]): walking a 151k-token vocabulary takes
//! a noticeable part of a second (benches/README.md, "Figures moved from
//! code comments"),
//! which start-up should not pay for a feature a deployment may never use. Each distinct format is compiled once and kept in a bounded cache keyed by
//! its content, and a request gets a copy of the compiled, unstarted matcher.

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use llguidance::api::{ParserLimits, TopLevelGrammar};
use llguidance::{Matcher, ParserFactory};
use lru::LruCache;
use toktrie::{ApproximateTokEnv, TokRxInfo, TokTrie};

use super::error::EngineError;
use super::gbnf;
use super::json_numbers::{NumberDigits, MAX_DIGITS};

/// What a reply's text must be.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ResponseFormat {
    /// A JSON Schema document, as JSON text.
    JsonSchema(String),
    /// Any JSON object.
    JsonObject,
    /// The whole reply matches this regular expression.
    Regex(String),
    /// A GBNF grammar (llama.cpp's format) with start rule `root`.
    Grammar(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
}

impl ResponseFormat {
    /// The request field that holds this format, for error messages.
    pub fn field(&self) -> &'static str {
        match self {
            ResponseFormat::JsonSchema(_) => "response_format.json_schema",
            ResponseFormat::JsonObject => "response_format.json_object",
            ResponseFormat::Regex(_) => "response_format.regex",
            ResponseFormat::Grammar(_) => "response_format.grammar",
            ResponseFormat::Choice(_) => "response_format.choice.options",
        }
    }

    /// The size of the format as the client sent it.
    pub fn size(&self) -> usize {
        match self {
            ResponseFormat::JsonSchema(s)
            | ResponseFormat::Regex(s)
            | ResponseFormat::Grammar(s) => s.len(),
            ResponseFormat::JsonObject => 0,
            ResponseFormat::Choice(options) => options.iter().map(String::len).sum(),
        }
    }

    /// Whether the reply is JSON, whose numbers get bounded digits
    /// (`json_numbers.rs`). A regex or grammar says its own digits.
    fn is_json(&self) -> bool {
        matches!(
            self,
            ResponseFormat::JsonSchema(_) | ResponseFormat::JsonObject
        )
    }

    /// The format as an llguidance grammar, or why it is not one.
    fn grammar(&self) -> Result<TopLevelGrammar, String> {
        match self {
            ResponseFormat::JsonSchema(text) => {
                let mut schema: serde_json::Value =
                    serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
                if schema == serde_json::Value::Bool(true) {
                    // Any JSON value, laid out as below.
                    schema = serde_json::json!({});
                }
                let object = match &mut schema {
                    serde_json::Value::Object(object) => object,
                    serde_json::Value::Bool(false) => {
                        return Err("the schema `false` allows no reply".into())
                    }
                    _ => return Err("a schema is a JSON object (or true)".into()),
                };
                // One space after `,` and `:` and none elsewhere, as Python's
                // json.dumps writes; a model cannot pad the reply with
                // whitespace forever. Keywords llguidance cannot honour are
                // refused (not lenient), not silently ignored.
                object.insert("x-guidance".into(), json_options());
                Ok(TopLevelGrammar::from_json_schema(schema))
            }
            ResponseFormat::JsonObject => Ok(TopLevelGrammar::from_json_schema(
                serde_json::json!({"type": "object", "x-guidance": json_options()}),
            )),
            ResponseFormat::Regex(rx) => {
                regex_syntax::Parser::new()
                    .parse(rx)
                    .map_err(|e| format!("invalid regex: {}", regex_error(&e)))?;
                Ok(TopLevelGrammar::from_regex(rx))
            }
            ResponseFormat::Grammar(gbnf) => Ok(TopLevelGrammar::from_lark(gbnf::to_lark(gbnf)?)),
            ResponseFormat::Choice(options) => {
                if options.is_empty() {
                    return Err("at least one option is required".into());
                }
                if let Some(i) = options.iter().position(String::is_empty) {
                    return Err(format!("option {i} is empty"));
                }
                let alternatives: Vec<String> = options
                    .iter()
                    .map(|o| serde_json::to_string(o).expect("a string serializes"))
                    .collect();
                Ok(TopLevelGrammar::from_lark(format!(
                    "start: {}\n",
                    alternatives.join(" | ")
                )))
            }
        }
    }
}

fn json_options() -> serde_json::Value {
    serde_json::json!({
        "whitespace_flexible": false,
        "item_separator": ", ",
        "key_separator": ": ",
        "lenient": false,
    })
}

/// What is wrong with a regex and where, on one line (the crate's own text
/// draws a caret under the pattern over several lines).
fn regex_error(e: &regex_syntax::Error) -> String {
    match e {
        regex_syntax::Error::Parse(e) => format!("{} at byte {}", e.kind(), e.span().start.offset),
        regex_syntax::Error::Translate(e) => {
            format!("{} at byte {}", e.kind(), e.span().start.offset)
        }
        other => one_line(&other.to_string()),
    }
}

/// Error text on one line (regex errors draw a caret under the pattern).
fn one_line(text: &str) -> String {
    text.split('\n')
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.chars().all(|c| c == '^' || c == '~'))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Limits on formats, from the config.
#[derive(Clone, Debug, PartialEq)]
pub struct FormatLimits {
    /// Largest format accepted, in bytes.
    pub max_bytes: usize,
    /// Compiled formats kept for reuse.
    pub cache_entries: usize,
    /// Work allowed to build a format's lexer (llguidance's initial lexer fuel).
    pub compile_fuel: u64,
    /// Work allowed per token's mask (llguidance's step lexer fuel).
    pub mask_fuel: u64,
    /// Lexer states a format may create (each costs 1-2 kB).
    pub max_lexer_states: usize,
}

impl Default for FormatLimits {
    fn default() -> Self {
        let llg = ParserLimits::default();
        FormatLimits {
            max_bytes: 64 * 1024,
            cache_entries: 64,
            compile_fuel: llg.initial_lexer_fuel,
            mask_fuel: llg.step_lexer_fuel,
            max_lexer_states: llg.max_lexer_states,
        }
    }
}

/// A model's vocabulary as constraints see it.
pub struct Vocabulary {
    /// Each token's bytes; special tokens as `0xFF` followed by their text,
    /// which no format's text can contain.
    pub tokens: Vec<Vec<u8>>,
    /// End-of-generation tokens, allowed once a format is complete.
    pub end_of_generation: Vec<u32>,
    /// The model's own tokenizer (text as the model would have read it),
    /// which lets a format's forced text become forced tokens
    /// ([`Constraint::forced`]); without it nothing is forced.
    pub tokenize: Option<Tokenize>,
}

/// Text bytes to the model's tokens, special-token text left as text.
pub type Tokenize = Arc<dyn Fn(&[u8]) -> Vec<u32> + Send + Sync>;

/// The vocabulary with the model's tokenizer: llguidance forces tokens only
/// through a tokenizer that gives the model's own (canonical) tokenization.
struct ModelTokEnv {
    trie: TokTrie,
    tokenize: Tokenize,
}

impl toktrie::TokenizerEnv for ModelTokEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<u32> {
        (self.tokenize)(s)
    }

    fn tokenize_is_canonical(&self) -> bool {
        true
    }
}

/// Where a [`FormatCompiler`] gets its vocabulary, when it first needs it.
type VocabularySource = Box<dyn Fn() -> Vocabulary + Send + Sync>;

/// Compiles formats for one model and keeps the compiled ones.
pub struct FormatCompiler {
    vocabulary: VocabularySource,
    /// Built from `vocabulary` by the first compile; an error if it cannot be.
    factory: OnceLock<Result<ParserFactory, String>>,
    limits: FormatLimits,
    cache: Mutex<LruCache<ResponseFormat, Matcher>>,
    /// Tokens that hold more than [`MAX_DIGITS`] digits in a row (none in
    /// Qwen's vocabulary), found with the first JSON format.
    long_digit_tokens: OnceLock<Arc<Vec<u32>>>,
}

impl FormatCompiler {
    /// A compiler that reads the vocabulary from `vocabulary` when the first
    /// format arrives.
    pub fn new(
        vocabulary: impl Fn() -> Vocabulary + Send + Sync + 'static,
        limits: FormatLimits,
    ) -> Self {
        let entries = NonZeroUsize::new(limits.cache_entries).unwrap_or(NonZeroUsize::MIN);
        FormatCompiler {
            vocabulary: Box::new(vocabulary),
            factory: OnceLock::new(),
            limits,
            cache: Mutex::new(LruCache::new(entries)),
            long_digit_tokens: OnceLock::new(),
        }
    }

    /// The digit state of a fresh JSON reply, with the vocabulary's tokens
    /// that carry an overlong run of digits.
    fn json_numbers(&self) -> Result<JsonNumbers, EngineError> {
        let factory = self.factory()?;
        let long = self.long_digit_tokens.get_or_init(|| {
            let trie = factory.tok_env().tok_trie();
            Arc::new(
                (0..trie.vocab_size() as u32)
                    .filter(|&t| has_long_digit_run(trie.token(t)))
                    .collect(),
            )
        });
        Ok(JsonNumbers {
            digits: NumberDigits::default(),
            long_digit_tokens: long.clone(),
            env: factory.tok_env().clone(),
        })
    }

    /// The token trie and parser settings, built on first use.
    fn factory(&self) -> Result<&ParserFactory, EngineError> {
        self.factory
            .get_or_init(|| {
                let started = Instant::now();
                let factory = build_factory((self.vocabulary)(), &self.limits);
                tracing::info!(
                    ms = started.elapsed().as_secs_f64() * 1e3,
                    "constraint vocabulary built"
                );
                factory
            })
            .as_ref()
            .map_err(|e| EngineError::Inference(e.clone()))
    }

    /// A fresh constraint for one sequence, or INVALID_ARGUMENT naming the
    /// field and the reason. Compiles the format unless it is cached.
    pub fn compile(&self, format: &ResponseFormat) -> Result<Constraint, EngineError> {
        let invalid = |message: String| EngineError::invalid(format.field(), message);
        if format.size() > self.limits.max_bytes {
            return Err(invalid(format!(
                "{} bytes, over the limit of {} bytes (max_format_kb)",
                format.size(),
                self.limits.max_bytes
            )));
        }
        let numbers = match format.is_json() {
            true => Some(self.json_numbers()?),
            false => None,
        };
        if let Some(matcher) = self.cache().get(format) {
            return Ok(Constraint::new(matcher.deep_clone(), numbers));
        }
        let started = Instant::now();
        let grammar = format.grammar().map_err(invalid)?;
        let matcher = Matcher::new(self.factory()?.create_parser(grammar));
        if let Some(error) = matcher.get_error() {
            return Err(invalid(one_line(&error)));
        }
        let mut cache = self.cache();
        cache.put(format.clone(), matcher.deep_clone());
        tracing::info!(
            field = format.field(),
            bytes = format.size(),
            compile_ms = started.elapsed().as_secs_f64() * 1e3,
            cached = cache.len(),
            "response format compiled"
        );
        Ok(Constraint::new(matcher, numbers))
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, LruCache<ResponseFormat, Matcher>> {
        // A panic while holding the lock leaves a usable cache.
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// llguidance's parser factory over `vocabulary`, with `limits`.
fn build_factory(vocabulary: Vocabulary, limits: &FormatLimits) -> Result<ParserFactory, String> {
    let eos = *vocabulary
        .end_of_generation
        .first()
        .ok_or("the model has no end-of-generation token")?;
    let info = TokRxInfo::new(vocabulary.tokens.len() as u32, eos);
    let trie =
        TokTrie::from(&info, &vocabulary.tokens).with_eos_tokens(&vocabulary.end_of_generation);
    let env: toktrie::TokEnv = match vocabulary.tokenize {
        Some(tokenize) => Arc::new(ModelTokEnv { trie, tokenize }),
        None => Arc::new(ApproximateTokEnv::new(trie)),
    };
    let mut factory =
        ParserFactory::new_simple(&env).map_err(|e| format!("constraint engine: {e}"))?;
    factory.quiet();
    let parser = factory.limits_mut();
    parser.initial_lexer_fuel = limits.compile_fuel;
    parser.step_lexer_fuel = limits.mask_fuel;
    parser.max_lexer_states = limits.max_lexer_states;
    // Errors name the problem; the grammar and tokens so far are noise.
    parser.verbose_errors = false;
    Ok(factory)
}

/// A JSON reply's digit state (`json_numbers.rs`).
#[derive(Clone)]
struct JsonNumbers {
    digits: NumberDigits,
    long_digit_tokens: Arc<Vec<u32>>,
    /// The vocabulary, for each token's bytes.
    env: toktrie::TokEnv,
}

/// One sequence's position in its format.
pub struct Constraint {
    matcher: Matcher,
    /// For a JSON reply: where its text stands, to bound number digits.
    numbers: Option<JsonNumbers>,
    /// Time spent computing masks and advancing the matcher (the
    /// constraint's whole cost per sequence).
    pub mask_time: Duration,
}

impl Constraint {
    fn new(matcher: Matcher, numbers: Option<JsonNumbers>) -> Self {
        Constraint {
            matcher,
            numbers,
            mask_time: Duration::ZERO,
        }
    }

    /// Sets every token the format does not allow next to -inf.
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<(), EngineError> {
        let t = Instant::now();
        let mask = self.matcher.compute_mask().map_err(failed)?;
        if mask.is_zero() {
            return Err(failed("no token can continue the reply"));
        }
        forbid(mask.as_slice(), logits);
        if let Some(numbers) = &self.numbers {
            Self::bound_digits(numbers, mask.as_slice(), logits);
        }
        self.mask_time += t.elapsed();
        Ok(())
    }

    /// Forbids the allowed tokens that would give a number part more digits
    /// than `json_numbers.rs` allows. Only inside a number, where the format allows
    /// few tokens, and for tokens that carry such a run themselves. Never
    /// forbids every token: a format that needs longer numbers (a minimum
    /// of 1e17) keeps its way to end.
    fn bound_digits(numbers: &JsonNumbers, allowed: &[u32], logits: &mut [f32]) {
        let trie = numbers.env.tok_trie();
        let is_allowed = |t: u32| {
            allowed
                .get(t as usize / 32)
                .is_some_and(|w| w & (1 << (t % 32)) != 0)
        };
        let goes_over = |t: u32| {
            let mut digits = numbers.digits;
            !digits.feed(trie.token(t))
        };
        let over: Vec<u32> = if numbers.digits.in_number() {
            allowed
                .iter()
                .enumerate()
                .flat_map(|(word, &bits)| {
                    (0..32)
                        .filter(move |i| bits & (1 << i) != 0)
                        .map(move |i| (word * 32 + i) as u32)
                })
                .filter(|&t| goes_over(t))
                .collect()
        } else {
            // Outside a number only a token's own run of digits can pass
            // the bound.
            numbers
                .long_digit_tokens
                .iter()
                .copied()
                .filter(|&t| is_allowed(t) && goes_over(t))
                .collect()
        };
        if over.is_empty() {
            return;
        }
        let allowed_count: usize = allowed.iter().map(|w| w.count_ones() as usize).sum();
        if over.len() < allowed_count {
            for token in over {
                if let Some(logit) = logits.get_mut(token as usize) {
                    *logit = f32::NEG_INFINITY;
                }
            }
        }
    }

    /// Advances past a sampled token (which the mask allowed).
    pub fn accept(&mut self, token: i32) -> Result<(), EngineError> {
        let t = Instant::now();
        let result = self.matcher.consume_token(token as u32).map_err(failed);
        if let Some(numbers) = &mut self.numbers {
            // Past the bound only where the format left no other way: count
            // anew from here.
            if !numbers
                .digits
                .feed(numbers.env.tok_trie().token(token as u32))
            {
                numbers.digits = NumberDigits::default();
            }
        }
        self.mask_time += t.elapsed();
        result
    }

    /// The tokens the format forces next, whatever the model would say: a
    /// JSON Schema's keys and punctuation, the rest of an enum value once
    /// only one fits. The model's own tokenization of that text, less a
    /// last token or two that the text after it could merge with
    /// (llguidance's fast-forward tokens). Not yet accepted: feed each to
    /// [`Constraint::accept`]. Empty without the model's tokenizer.
    pub fn forced(&mut self) -> Vec<i32> {
        let t = Instant::now();
        let forced = self.matcher.compute_ff_tokens();
        self.mask_time += t.elapsed();
        forced.into_iter().map(|t| t as i32).collect()
    }

    /// Whether the format is complete and allows nothing more.
    pub fn is_complete(&self) -> bool {
        self.matcher.is_stopped()
    }
}

/// Whether `bytes` hold more than [`MAX_DIGITS`] ASCII digits in a row.
fn has_long_digit_run(bytes: &[u8]) -> bool {
    bytes
        .split(|b| !b.is_ascii_digit())
        .any(|run| run.len() > MAX_DIGITS as usize)
}

/// Sets `logits[i]` to -inf where bit `i` of `allowed` is clear (and past
/// its end). A word at a time: most words of a mask are all clear or all set.
fn forbid(allowed: &[u32], logits: &mut [f32]) {
    let mut chunks = logits.chunks_mut(32);
    for (&bits, chunk) in allowed.iter().zip(&mut chunks) {
        match bits {
            0 => chunk.fill(f32::NEG_INFINITY),
            u32::MAX => {}
            _ => {
                for (i, logit) in chunk.iter_mut().enumerate() {
                    if bits & (1 << i) == 0 {
                        *logit = f32::NEG_INFINITY;
                    }
                }
            }
        }
    }
    for chunk in chunks {
        chunk.fill(f32::NEG_INFINITY);
    }
}

fn failed(e: impl std::fmt::Display) -> EngineError {
    EngineError::invalid(
        "response_format",
        format!("the constraint failed: {}", one_line(&e.to_string())),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every single byte as a token, a few words, and an end token.
    fn compiler(limits: FormatLimits) -> FormatCompiler {
        let mut tokens: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        for w in ["yes", "no", "{\"", "\": ", "true", "12"] {
            tokens.push(w.as_bytes().to_vec());
        }
        tokens.push(b"\xFF<|im_end|>".to_vec());
        let eos = tokens.len() as u32 - 1;
        FormatCompiler::new(
            move || Vocabulary {
                tokens: tokens.clone(),
                end_of_generation: vec![eos],
                tokenize: None,
            },
            limits,
        )
    }

    /// Single bytes, a few words and an end token, with a tokenizer (longest
    /// word first) standing in for the model's.
    fn canonical_compiler() -> (FormatCompiler, Vec<Vec<u8>>) {
        let mut tokens: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        for w in ["{\"", "name", "\": ", "colour", "\", \""] {
            tokens.push(w.as_bytes().to_vec());
        }
        tokens.push(b"\xFF<|im_end|>".to_vec());
        let eos = tokens.len() as u32 - 1;
        let words = tokens.clone();
        let tokenize: Tokenize = Arc::new(move |mut bytes: &[u8]| {
            let mut ids = Vec::new();
            while !bytes.is_empty() {
                let (id, len) = (0..eos as usize)
                    .filter(|&t| bytes.starts_with(&words[t]))
                    .map(|t| (t as u32, words[t].len()))
                    .max_by_key(|&(_, len)| len)
                    .unwrap();
                ids.push(id);
                bytes = &bytes[len..];
            }
            ids
        });
        let vocabulary = tokens.clone();
        let compiler = FormatCompiler::new(
            move || Vocabulary {
                tokens: vocabulary.clone(),
                end_of_generation: vec![eos],
                tokenize: Some(tokenize.clone()),
            },
            FormatLimits::default(),
        );
        (compiler, tokens)
    }

    #[test]
    fn forced_text_is_the_tokenizers_tokens_and_the_only_ones_a_mask_allows() {
        let (compiler, tokens) = canonical_compiler();
        let schema = r#"{"type":"object","properties":{"name":{"type":"string"},"colour":{"enum":["red"]}},"required":["name","colour"],"additionalProperties":false}"#;
        let format = ResponseFormat::JsonSchema(schema.into());
        let text = |ids: &[i32]| -> String {
            ids.iter()
                .map(|&t| String::from_utf8_lossy(&tokens[t as usize]).into_owned())
                .collect()
        };
        // Jump-forward: the forced runs, accepted as they come; the "model"
        // opens the string (`"` could start `", "` too: not forced), writes
        // `x` and closes it.
        let mut jumping = compiler.compile(&format).unwrap();
        let mut reply = Vec::new();
        let mut runs = Vec::new();
        let mut sampled = Vec::new();
        let mut script = [b'"' as i32, b'x' as i32, b'"' as i32].into_iter();
        while !jumping.is_complete() {
            let forced = jumping.forced();
            for &f in &forced {
                jumping.accept(f).unwrap();
            }
            reply.extend(&forced);
            runs.push(text(&forced));
            if jumping.is_complete() {
                break;
            }
            let allowed = allowed(&mut jumping, tokens.len());
            let t = match allowed.as_slice() {
                [only] => *only as i32,
                _ => script.next().expect("the format ends after the script"),
            };
            if allowed.len() > 1 {
                sampled.push(t);
            }
            jumping.accept(t).unwrap();
            reply.push(t);
        }
        assert_eq!(runs, [r#"{"name": "#, "", "", r#", "colour": "red"}"#]);
        assert_eq!(text(&reply), r#"{"name": "x", "colour": "red"}"#);
        // Step by step, each forced token is the only one its mask allows,
        // so a sampler picks it whatever the logits: the same reply.
        let mut stepping = compiler.compile(&format).unwrap();
        let mut sampled_at = Vec::new();
        for &t in &reply {
            let allowed = allowed(&mut stepping, tokens.len());
            if allowed.len() > 1 {
                sampled_at.push(t);
            } else {
                assert_eq!(allowed, [t as usize], "{:?}", text(&[t]));
            }
            stepping.accept(t).unwrap();
        }
        assert_eq!(sampled_at, sampled);
        assert_eq!(sampled.len(), 3, "only the string was sampled");
        // Without the model's tokenizer nothing is forced.
        let mut plain = compiler_without_tokenizer().compile(&format).unwrap();
        assert!(plain.forced().is_empty());
    }

    fn compiler_without_tokenizer() -> FormatCompiler {
        compiler(FormatLimits::default())
    }

    /// Feeds `text` one byte token at a time; the logits of the next step.
    fn after(constraint: &mut Constraint, text: &str, vocab: usize) -> Vec<f32> {
        for b in text.bytes() {
            let mut logits = vec![0.0; vocab];
            constraint.mask(&mut logits).unwrap();
            assert!(
                logits[b as usize].is_finite(),
                "{:?} not allowed",
                b as char
            );
            constraint.accept(i32::from(b)).unwrap();
        }
        let mut logits = vec![0.0; vocab];
        constraint.mask(&mut logits).unwrap();
        logits
    }

    #[test]
    fn json_numbers_end_after_sixteen_digits_a_part_but_strings_do_not() {
        let compiler = compiler(FormatLimits::default());
        let vocab = 256 + 7;
        let schema = r#"{"type": "object", "properties": {"n": {"type": "number"},
            "s": {"type": "string"}}, "required": ["n", "s"]}"#;
        let format = ResponseFormat::JsonSchema(schema.into());
        let digit = b'4' as usize;
        let mut c = compiler.compile(&format).unwrap();
        let logits = after(&mut c, &format!("{{\"n\": 7.{}", "4".repeat(15)), vocab);
        assert!(logits[digit].is_finite(), "the 16th fractional digit");
        let logits = after(&mut c, "4", vocab);
        assert_eq!(logits[digit], f32::NEG_INFINITY, "a 17th");
        assert!(logits[b',' as usize].is_finite(), "the number can end");
        // The same text in a string is not bounded.
        let mut c = compiler.compile(&format).unwrap();
        let logits = after(
            &mut c,
            &format!("{{\"n\": 1, \"s\": \"{}", "4".repeat(40)),
            vocab,
        );
        assert!(logits[digit].is_finite());
        // A regex says its own digits.
        let mut c = compiler
            .compile(&ResponseFormat::Regex("[0-9]+".into()))
            .unwrap();
        assert!(after(&mut c, &"4".repeat(40), vocab)[digit].is_finite());
    }

    #[test]
    fn a_format_that_needs_long_numbers_still_ends() {
        let compiler = compiler(FormatLimits::default());
        let format = ResponseFormat::JsonSchema(
            r#"{"type": "integer", "minimum": 100000000000000000}"#.into(),
        );
        let mut c = compiler.compile(&format).unwrap();
        let logits = after(&mut c, &"1".repeat(16), 256 + 7);
        assert!(logits.iter().any(|l| l.is_finite()), "some token is left");
    }

    #[test]
    fn the_vocabulary_is_read_once_and_only_when_a_format_arrives() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let reads = Arc::new(AtomicUsize::new(0));
        let counted = reads.clone();
        let compiler = FormatCompiler::new(
            move || {
                counted.fetch_add(1, Ordering::Relaxed);
                Vocabulary {
                    tokens: (0..=255u8).map(|b| vec![b]).collect(),
                    end_of_generation: vec![0],
                    tokenize: None,
                }
            },
            FormatLimits::default(),
        );
        assert_eq!(reads.load(Ordering::Relaxed), 0, "not at start-up");
        for rx in ["a", "b", "a"] {
            compiler.compile(&ResponseFormat::Regex(rx.into())).unwrap();
        }
        assert_eq!(reads.load(Ordering::Relaxed), 1);
        // A vocabulary without an end token is an error for the request, not
        // a panic, and stays one.
        let broken = FormatCompiler::new(
            || Vocabulary {
                tokens: vec![b"a".to_vec()],
                end_of_generation: Vec::new(),
                tokenize: None,
            },
            FormatLimits::default(),
        );
        for _ in 0..2 {
            let error = broken
                .compile(&ResponseFormat::Regex("a".into()))
                .err()
                .unwrap();
            assert!(
                error.to_string().contains("no end-of-generation token"),
                "{error}"
            );
        }
    }

    fn allowed(c: &mut Constraint, n: usize) -> Vec<usize> {
        let mut logits = vec![0.0f32; n];
        c.mask(&mut logits).unwrap();
        (0..n).filter(|&i| logits[i].is_finite()).collect()
    }

    #[test]
    fn forbidden_tokens_get_minus_infinity_and_allowed_keep_their_logit() {
        let mut logits: Vec<f32> = (0..80).map(|i| i as f32).collect();
        // Tokens 1 and 33 allowed, the third word all set, nothing past it.
        forbid(&[0b10, 0b10, u32::MAX], &mut logits);
        let kept: Vec<usize> = (0..80).filter(|&i| logits[i].is_finite()).collect();
        assert_eq!(kept, [vec![1, 33], (64..80).collect()].concat());
        assert_eq!(logits[33], 33.0);
        let mut longer = vec![0.0f32; 40];
        forbid(&[u32::MAX], &mut longer);
        assert!(longer[..32].iter().all(|l| *l == 0.0));
        assert!(longer[32..].iter().all(|l| *l == f32::NEG_INFINITY));
    }

    #[test]
    fn a_choice_allows_only_its_options_and_ends_when_one_is_complete() {
        let compiler = compiler(FormatLimits::default());
        let mut c = compiler
            .compile(&ResponseFormat::Choice(vec!["yes".into(), "no".into()]))
            .unwrap();
        let first = allowed(&mut c, 263);
        assert!(first.contains(&(b'y' as usize)) && first.contains(&(b'n' as usize)));
        assert!(
            first.contains(&256) && first.contains(&257),
            "the whole words"
        );
        assert!(!first.contains(&(b'x' as usize)));
        c.accept(256).unwrap();
        assert!(c.is_complete());
    }

    #[test]
    fn a_regex_is_matched_whole() {
        let compiler = compiler(FormatLimits::default());
        let mut c = compiler
            .compile(&ResponseFormat::Regex("[0-9]{2}".into()))
            .unwrap();
        let digits = allowed(&mut c, 263);
        assert!(digits.contains(&(b'1' as usize)) && digits.contains(&261));
        assert!(!digits.contains(&262), "no end before two digits");
        c.accept(b'4' as i32).unwrap();
        c.accept(b'2' as i32).unwrap();
        assert!(c.is_complete());
    }

    #[test]
    fn a_compiled_format_is_reused_and_the_cache_stays_bounded() {
        let compiler = compiler(FormatLimits {
            cache_entries: 2,
            ..FormatLimits::default()
        });
        for rx in ["a", "b", "a", "c"] {
            compiler.compile(&ResponseFormat::Regex(rx.into())).unwrap();
        }
        assert_eq!(compiler.cache().len(), 2);
        // A copy from the cache starts at the beginning, whatever the
        // previous copy consumed.
        let format = ResponseFormat::Choice(vec!["yes".into()]);
        let mut first = compiler.compile(&format).unwrap();
        first.accept(256).unwrap();
        let mut second = compiler.compile(&format).unwrap();
        assert!(!second.is_complete());
        assert!(allowed(&mut second, 263).contains(&256));
    }

    #[test]
    fn bad_formats_name_the_field_and_the_reason() {
        let compiler = compiler(FormatLimits {
            max_bytes: 100,
            ..FormatLimits::default()
        });
        let cases = [
            (
                ResponseFormat::JsonSchema("{".into()),
                "response_format.json_schema: not JSON",
            ),
            (
                ResponseFormat::JsonSchema("[1]".into()),
                "response_format.json_schema: a schema is a JSON object",
            ),
            (
                ResponseFormat::JsonSchema("false".into()),
                "response_format.json_schema: the schema `false` allows no reply",
            ),
            (
                ResponseFormat::JsonSchema(
                    r#"{"type":"object","properties":{"a":{"type":"nonsense"}}}"#.into(),
                ),
                "nonsense",
            ),
            (
                ResponseFormat::JsonSchema(r#"{"type":"array","uniqueItems":true}"#.into()),
                "uniqueItems",
            ),
            (
                ResponseFormat::Regex("(".into()),
                "response_format.regex: invalid regex",
            ),
            (
                ResponseFormat::Grammar("root ::= other".into()),
                "response_format.grammar: rule `root` refers to undefined rule `other`",
            ),
            (
                ResponseFormat::Choice(vec![]),
                "response_format.choice.options: at least one option",
            ),
            (
                ResponseFormat::Choice(vec!["a".into(), String::new()]),
                "option 1 is empty",
            ),
            (
                ResponseFormat::Regex("a".repeat(101)),
                "101 bytes, over the limit of 100",
            ),
        ];
        for (format, want) in cases {
            let error = compiler
                .compile(&format)
                .err()
                .unwrap_or_else(|| panic!("not refused: {format:?}"))
                .to_string();
            assert!(error.contains(want), "{format:?}: {error}");
            assert!(!error.contains('\n'), "one line: {error}");
        }
        let at_limit = ResponseFormat::Regex("a".repeat(100));
        assert!(compiler.compile(&at_limit).is_ok());
    }

    #[test]
    fn a_format_too_costly_to_compile_is_refused_and_the_compiler_goes_on() {
        let properties: Vec<String> = (0..300)
            .map(|i| format!(r#""p{i}": {{"type": "string", "pattern": "[a-z]{{3,9}}"}}"#))
            .collect();
        let schema = ResponseFormat::JsonSchema(format!(
            r#"{{"type": "object", "properties": {{{}}}}}"#,
            properties.join(", ")
        ));
        let tight = compiler(FormatLimits {
            compile_fuel: 1_000,
            ..FormatLimits::default()
        });
        let error = tight.compile(&schema).err().expect("refused").to_string();
        assert!(
            error.starts_with("response_format.json_schema: ") && error.contains("too big"),
            "{error}"
        );
        assert!(tight
            .compile(&ResponseFormat::Regex("[0-9]+".into()))
            .is_ok());
        assert!(compiler(FormatLimits::default()).compile(&schema).is_ok());
    }

    #[test]
    fn huge_repetitions_are_refused_not_expanded() {
        let compiler = compiler(FormatLimits::default());
        let formats = [
            ResponseFormat::JsonSchema(
                r#"{"type": "array", "items": {"type": "integer"}, "minItems": 100000000}"#.into(),
            ),
            ResponseFormat::JsonSchema(r#"{"type": "string", "minLength": 1000000000}"#.into()),
            ResponseFormat::Grammar("root ::= \"a\"{0,100000000}".into()),
            ResponseFormat::Regex("a{1000}{1000}{1000}".into()),
        ];
        for format in formats {
            match compiler.compile(&format) {
                Err(e) => assert!(e.to_string().starts_with(format.field()), "{e}"),
                Ok(mut c) => {
                    // Accepted: it must still answer a mask at once.
                    let mut logits = vec![0.0f32; 263];
                    c.mask(&mut logits).unwrap();
                }
            }
        }
    }
}
