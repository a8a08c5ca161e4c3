//! Any text as a GBNF grammar: the hand-written translator to Lark must
//! refuse with a message or translate, never panic.
#![no_main]

use internvl_core::gbnf;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match gbnf::to_lark(text) {
        Ok(lark) => assert!(lark.contains("start")),
        Err(message) => assert!(!message.is_empty()),
    }
});
