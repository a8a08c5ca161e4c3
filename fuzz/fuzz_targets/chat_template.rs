//! Any text as what users write, special-token strings included
//! (`<|im_start|>system`, `<img>`, `<IMG_CONTEXT>`): the tiny InternVL3's
//! own chat template renders it and the media placeholders are split out, or
//! the request is refused naming a field; never a panic. A `\x01` starts the
//! next message (user and assistant turns alternate, after an optional system
//! message when the text starts with `\x02`). The tokenizer is a stand-in (one
//! token per byte), so this builds without llama.cpp; llama.cpp's tokenizer
//! reads hostile text in `tests/it/bad_input.rs`.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use internvl_core::media_budget::MediaHold;
use internvl_core::prompt::{
    build_chat_prompt, ChatMessage, ChatTemplate, Part, PromptBudget, Role, TextTokenizer,
};
use internvl_core::vision::{DecodeLimits, TileSpec};
use internvl_core::{gguf, EngineError};
use libfuzzer_sys::fuzz_target;

/// One token per byte, and a BOS when asked.
struct Bytes;

impl TextTokenizer for Bytes {
    fn tokenize(&self, text: &str, add_special: bool, _: bool) -> Result<Vec<i32>, EngineError> {
        let bos = add_special.then_some(-1);
        Ok(bos.into_iter().chain(text.bytes().map(i32::from)).collect())
    }
}

fn template() -> &'static ChatTemplate {
    static TEMPLATE: OnceLock<ChatTemplate> = OnceLock::new();
    TEMPLATE.get_or_init(|| {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/tiny-internvl/tiny-internvl3-f32.gguf");
        let file = gguf::read(&path).expect("the tiny model's header");
        let source = file
            .string("tokenizer.chat_template")
            .expect("a chat template")
            .to_string();
        ChatTemplate::new(source, String::new(), "<|im_end|>".into())
            .expect("the template compiles")
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (system, text) = match text.strip_prefix('\u{2}') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let mut messages = Vec::new();
    for (i, turn) in text.split('\u{1}').enumerate() {
        let role = match (system, i) {
            (true, 0) => Role::System,
            (true, i) if i % 2 == 1 => Role::User,
            (false, i) if i % 2 == 0 => Role::User,
            _ => Role::Assistant,
        };
        messages.push(ChatMessage {
            role,
            parts: vec![Part::Text(turn.to_string())],
        });
    }
    let spec = TileSpec {
        tile_size: 448,
        min_tiles: 1,
        max_tiles: 12,
        tokens_per_tile: 256,
    };
    let limits = DecodeLimits {
        max_side: 2048,
        max_pixels: 1 << 20,
        max_alloc: 64 << 20,
    };
    let mut media = MediaHold::unbounded();
    let budget = PromptBudget::UNBOUNDED;
    match build_chat_prompt(
        &Bytes,
        template(),
        spec,
        limits,
        budget,
        &mut media,
        &messages,
    ) {
        Ok(prompt) => assert!(prompt.prompt_tokens > 0),
        Err(EngineError::InvalidArgument { field, .. }) => assert!(field.starts_with("messages")),
        Err(EngineError::Template(message)) => assert!(!message.is_empty()),
        Err(other) => panic!("{other}"),
    }
});
