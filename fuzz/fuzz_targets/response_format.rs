//! Any bytes as a `response_format` (the first byte picks the kind: JSON
//! Schema, regex, GBNF grammar or choice): compiling within the configured
//! fuel refuses naming the field, or gives a constraint whose first masks
//! compute and whose forced tokens (jump-forward) are each the only token
//! the mask allows; and a plain format still compiles afterwards (the
//! compiler keeps serving after whatever it was sent). libFuzzer's -timeout
//! bounds the time.
#![no_main]

#[path = "shared/formats.rs"]
mod formats;

use formats::{compiler, VOCAB};
use internvl_core::constraint::ResponseFormat;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&kind, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let format = match kind % 5 {
        0 => ResponseFormat::JsonSchema(text.into()),
        1 => ResponseFormat::Regex(text.into()),
        2 => ResponseFormat::Grammar(text.into()),
        3 => ResponseFormat::Choice(text.split('\n').map(str::to_string).collect()),
        _ => ResponseFormat::JsonObject,
    };
    match compiler().compile(&format) {
        Ok(mut constraint) => {
            // A few steps: mask, then take the first allowed token.
            for _ in 0..8 {
                let mut logits = vec![0.0f32; VOCAB];
                if constraint.mask(&mut logits).is_err() {
                    break;
                }
                let Some(token) = logits.iter().position(|l| l.is_finite()) else {
                    panic!("a mask that allows nothing was not an error");
                };
                if constraint.accept(token as i32).is_err() || constraint.is_complete() {
                    break;
                }
                // Jump-forward's run, checked against step-by-step masks.
                for forced in constraint.forced() {
                    let mut logits = vec![0.0f32; VOCAB];
                    if constraint.mask(&mut logits).is_err() {
                        break;
                    }
                    let allowed: Vec<usize> =
                        (0..VOCAB).filter(|&t| logits[t].is_finite()).collect();
                    assert_eq!(allowed, [forced as usize], "a forced token not forced by its mask");
                    if constraint.accept(forced).is_err() || constraint.is_complete() {
                        break;
                    }
                }
            }
        }
        Err(e) => {
            let message = e.to_string();
            assert!(message.starts_with("response_format"), "{message}");
        }
    }
    assert!(compiler()
        .compile(&ResponseFormat::Regex("(yes|no)".into()))
        .is_ok());
});
