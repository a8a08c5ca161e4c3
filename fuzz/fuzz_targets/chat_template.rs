//! Any text as what users write, special-token strings included
//! (`<|im_start|>system`, `<img>`, `<IMG_CONTEXT>`): the tiny InternVL3's
//! own chat template renders it and llama.cpp's tokenizer reads it, or the
//! request is refused naming a field; never a panic or an abort. A `\x01`
//! starts the next message (user and assistant turns alternate, after an
//! optional system message when the text starts with `\x02`).
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use internvl_grpc::engine::llama::{self, Model, ModelParams};
use internvl_grpc::engine::prompt::{build_chat_prompt, ChatTemplate};
use internvl_grpc::engine::{
    ChatMessage, DecodeLimits, EngineError, Part, Role, SplitMode, TileSpec,
};
use libfuzzer_sys::fuzz_target;

struct Loaded {
    model: Model,
    template: ChatTemplate,
}

fn loaded() -> &'static Loaded {
    static LOADED: OnceLock<Loaded> = OnceLock::new();
    LOADED.get_or_init(|| {
        llama::init_backend(false, &[]).expect("llama.cpp");
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/tiny-internvl/tiny-internvl3-f32.gguf");
        let model = Model::load(
            &path,
            &ModelParams {
                n_gpu_layers: 0,
                main_gpu: 0,
                split_mode: SplitMode::None,
                tensor_split: vec![],
                devices: vec![],
                rpc_servers: vec![],
                vulkan_devices: vec![],
            },
        )
        .expect("the tiny model loads");
        let source = model.chat_template().expect("a chat template");
        let template = ChatTemplate::new(source, String::new(), "<|im_end|>".into())
            .expect("the template compiles");
        Loaded { model, template }
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
    let l = loaded();
    match build_chat_prompt(&l.model, &l.template, spec, limits, &messages) {
        Ok(prompt) => assert!(prompt.prompt_tokens > 0),
        Err(EngineError::InvalidArgument { field, .. }) => assert!(field.starts_with("messages")),
        Err(EngineError::Template(message)) => assert!(!message.is_empty()),
        Err(other) => panic!("{other}"),
    }
});
