//! llama.cpp's, ggml's and mtmd's log lines, into `tracing` (target
//! `llama.cpp`, field `module`).
//!
//! Their information lines (model metadata, tensor counts, the vision
//! hparams: over 150 at every start) go to DEBUG unless the deployment asks
//! for them; warnings and errors keep their level. llama.cpp writes a line
//! in pieces (`GGML_LOG_LEVEL_CONT` continues the last one, progress dots
//! have no newline of their own), so each module's pieces are joined here
//! into whole lines before one event per line is emitted; blank lines are
//! dropped. Written here rather than taken from `llama-cpp-2`'s bridge, whose
//! INFO lines cannot be lowered and which warns on every CONT that follows a
//! finished line.

use std::cell::RefCell;
use std::ffi::{c_char, c_void, CStr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use llama_cpp_sys_2 as sys;

/// Information lines at INFO instead of DEBUG (the `llama_info_logs` key).
static INFO_AT_INFO: AtomicBool = AtomicBool::new(false);

/// Where a line came from.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Module {
    Llama,
    Ggml,
    Mtmd,
}

impl Module {
    fn name(self) -> &'static str {
        match self {
            Module::Llama => "llama",
            Module::Ggml => "ggml",
            Module::Mtmd => "mtmd",
        }
    }
}

/// A log line's severity, as llama.cpp gives it.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Severity {
    Debug,
    Info,
    Warn,
    Error,
}

impl Severity {
    /// llama.cpp's level; `None` for CONT (the previous line goes on).
    fn of(level: sys::ggml_log_level) -> Option<Self> {
        match level {
            sys::GGML_LOG_LEVEL_CONT => None,
            sys::GGML_LOG_LEVEL_DEBUG => Some(Severity::Debug),
            sys::GGML_LOG_LEVEL_WARN => Some(Severity::Warn),
            sys::GGML_LOG_LEVEL_ERROR => Some(Severity::Error),
            // INFO, NONE and anything newer.
            _ => Some(Severity::Info),
        }
    }
}

/// One module's line in progress.
#[derive(Default)]
struct Lines {
    pending: String,
    severity: Option<Severity>,
}

impl Lines {
    /// Takes one piece of text; returns the lines it completes.
    fn push(&mut self, severity: Option<Severity>, text: &str) -> Vec<(Severity, String)> {
        let mut done = Vec::new();
        if let Some(severity) = severity {
            // A new message: whatever was left unfinished is a line of its own.
            if !self.pending.is_empty() {
                self.take_into(&mut done);
            }
            self.severity = Some(severity);
        }
        self.pending.push_str(text);
        while let Some(end) = self.pending.find('\n') {
            let rest = self.pending.split_off(end + 1);
            self.take_into(&mut done);
            self.pending = rest;
        }
        done
    }

    fn take_into(&mut self, done: &mut Vec<(Severity, String)>) {
        let line = std::mem::take(&mut self.pending);
        let line = line.trim_end();
        if !line.trim().is_empty() {
            done.push((self.severity.unwrap_or(Severity::Info), line.to_string()));
        }
    }
}

static LLAMA: Mutex<Lines> = Mutex::new(Lines {
    pending: String::new(),
    severity: None,
});
static GGML: Mutex<Lines> = Mutex::new(Lines {
    pending: String::new(),
    severity: None,
});
static MTMD: Mutex<Lines> = Mutex::new(Lines {
    pending: String::new(),
    severity: None,
});

fn lines_of(module: Module) -> &'static Mutex<Lines> {
    match module {
        Module::Llama => &LLAMA,
        Module::Ggml => &GGML,
        Module::Mtmd => &MTMD,
    }
}

thread_local! {
    /// Lines this thread's llama.cpp calls logged, while [`capture`] runs.
    static CAPTURED: RefCell<Option<Vec<String>>> = const { RefCell::new(None) };
}

/// Runs `f`, returning what it returns and every line llama.cpp, ggml and
/// mtmd logged on this thread meanwhile, whatever their level: where loading
/// put the model is only in those lines (`placement.rs`). Per thread, so two
/// engines loading at once in one process each read their own.
pub fn capture<T>(f: impl FnOnce() -> T) -> (T, Vec<String>) {
    let outer = CAPTURED.with(|c| c.borrow_mut().replace(Vec::new()));
    let result = f();
    let lines = CAPTURED.with(|c| std::mem::replace(&mut *c.borrow_mut(), outer));
    (result, lines.unwrap_or_default())
}

fn emit(module: Module, severity: Severity, line: &str) {
    CAPTURED.with(|c| {
        if let Some(lines) = c.borrow_mut().as_mut() {
            lines.push(line.to_string());
        }
    });
    let module = module.name();
    match severity {
        Severity::Error => tracing::error!(target: "llama.cpp", module, "{line}"),
        Severity::Warn => tracing::warn!(target: "llama.cpp", module, "{line}"),
        Severity::Info if INFO_AT_INFO.load(Ordering::Relaxed) => {
            tracing::info!(target: "llama.cpp", module, "{line}")
        }
        Severity::Info | Severity::Debug => tracing::debug!(target: "llama.cpp", module, "{line}"),
    }
}

/// The callback llama.cpp, ggml and mtmd call; `user_data` is the address of
/// a [`Module`] in static memory.
unsafe extern "C" fn on_log(
    level: sys::ggml_log_level,
    text: *const c_char,
    user_data: *mut c_void,
) {
    if text.is_null() || user_data.is_null() {
        return;
    }
    // SAFETY: `user_data` is one of the `&'static Module`s `route_logs` registered.
    let module = unsafe { *(user_data as *const Module) };
    // SAFETY: llama.cpp passes a NUL-terminated string valid for this call.
    let text = unsafe { CStr::from_ptr(text) }.to_string_lossy();
    // A panic must not unwind into C; a poisoned buffer is still usable.
    let done = match lines_of(module).lock() {
        Ok(mut lines) => lines.push(Severity::of(level), &text),
        Err(poisoned) => poisoned.into_inner().push(Severity::of(level), &text),
    };
    for (severity, line) in done {
        emit(module, severity, &line);
    }
}

/// Routes llama.cpp's, ggml's and mtmd's logs into `tracing`; `info_at_info`
/// keeps their information lines at INFO. Called once, before anything else
/// of llama.cpp runs.
pub(super) fn route_logs(info_at_info: bool) {
    static LLAMA_MODULE: Module = Module::Llama;
    static GGML_MODULE: Module = Module::Ggml;
    static MTMD_MODULE: Module = Module::Mtmd;
    INFO_AT_INFO.store(info_at_info, Ordering::Relaxed);
    let data = |m: &'static Module| m as *const Module as *mut c_void;
    // SAFETY: `on_log` matches `ggml_log_callback` and only reads the static
    // `Module` its user data points to, which outlives every call. llama's
    // setter also sets ggml's, so ggml's own comes after it.
    unsafe {
        sys::llama_log_set(Some(on_log), data(&LLAMA_MODULE));
        sys::mtmd_helper_log_set(Some(on_log), data(&MTMD_MODULE));
        sys::ggml_log_set(Some(on_log), data(&GGML_MODULE));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_become_whole_lines_with_their_severity() {
        let mut lines = Lines::default();
        let info = Some(Severity::Info);
        // A line in three pieces: the progress dots of a load.
        assert!(lines.push(info, "loading").is_empty());
        assert!(lines.push(None, ".").is_empty());
        assert_eq!(
            lines.push(None, ".done\n"),
            [(Severity::Info, "loading..done".to_string())]
        );
        // A CONT after a finished line (what the bindings' bridge warned on)
        // starts a line of the last severity.
        assert!(lines.push(None, "more").is_empty());
        // A new message ends the unfinished one.
        assert_eq!(
            lines.push(Some(Severity::Warn), "careful\n"),
            [
                (Severity::Info, "more".to_string()),
                (Severity::Warn, "careful".to_string())
            ]
        );
        // Blank lines and the newline-framed header of the vision hparams.
        assert_eq!(
            lines.push(info, "\n--- vision hparams ---\n\n"),
            [(Severity::Info, "--- vision hparams ---".to_string())]
        );
    }

    #[test]
    fn levels_map_cont_to_none() {
        assert_eq!(Severity::of(sys::GGML_LOG_LEVEL_CONT), None);
        assert_eq!(
            Severity::of(sys::GGML_LOG_LEVEL_ERROR),
            Some(Severity::Error)
        );
        assert_eq!(Severity::of(sys::GGML_LOG_LEVEL_NONE), Some(Severity::Info));
    }
}
