//! One span per call: its method, `request_id`, the W3C trace id a mesh sent,
//! and its outcome. The engine writes its lines about the request inside it
//! (the job carries it to the engine thread), so one request can be followed
//! through the logs and joined with the mesh's traces.

use tracing::field::Empty;
use tracing::Span;

/// The span of a call to `method`, with the trace id of its `traceparent`
/// value (however the transport carried it) when that value is well-formed.
pub fn span_for(method: &'static str, traceparent: Option<&str>) -> Span {
    let span = tracing::info_span!(
        "request",
        method,
        request_id = Empty,
        trace_id = Empty,
        outcome = Empty,
        prompt_tokens = Empty,
        completion_tokens = Empty,
    );
    if let Some(trace_id) = traceparent.and_then(trace_id) {
        span.record("trace_id", trace_id);
    }
    span
}

/// The trace id of a W3C `traceparent` value (`00-<32 hex>-<16 hex>-<2 hex>`),
/// or `None` when the value is not one: the spec says to ignore such a header,
/// and a hostile one must not reach the logs.
pub fn trace_id(traceparent: &str) -> Option<&str> {
    let mut parts = traceparent.trim().split('-');
    let version = parts.next()?;
    let trace = parts.next()?;
    let parent = parts.next()?;
    let flags = parts.next()?;
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let zero = |s: &str| s.bytes().all(|b| b == b'0');
    // Version 00 has exactly four fields; a later version may add some.
    let more = parts.next().is_some();
    let ok = hex(version, 2)
        && version != "ff"
        && !(version == "00" && more)
        && hex(trace, 32)
        && !zero(trace)
        && hex(parent, 16)
        && !zero(parent)
        && hex(flags, 2);
    ok.then_some(trace)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

    #[test]
    fn a_well_formed_traceparent_gives_its_trace_id() {
        let header = format!("00-{TRACE}-00f067aa0ba902b7-01");
        assert_eq!(trace_id(&header), Some(TRACE));
        // A later version may carry more fields.
        let later = format!("01-{TRACE}-00f067aa0ba902b7-01-extra");
        assert_eq!(trace_id(&later), Some(TRACE));
    }

    #[test]
    fn anything_else_is_ignored() {
        for header in [
            "",
            "garbage",
            &format!("ff-{TRACE}-00f067aa0ba902b7-01"),
            &format!("00-{TRACE}-00f067aa0ba902b7-01-extra"),
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            &format!("00-{TRACE}-0000000000000000-01"),
            &format!("00-{}-00f067aa0ba902b7-01", TRACE.to_uppercase()),
            &format!("00-{TRACE}x-00f067aa0ba902b7-01"),
            &format!("00-{TRACE}-00f067aa0ba902b7"),
            "00-4bf92f3577b34da6a3ce929d0e0e473\u{e9}-00f067aa0ba902b7-01",
        ] {
            assert_eq!(trace_id(header), None, "{header:?}");
        }
    }
}
