//! A request's sampling settings, the reference's greedy choice, log-probabilities,
//! and turning token bytes into streamable text (whole UTF-8 characters, stop
//! sequences held back). The sampler chain itself is llama.cpp's (the engine's
//! `llama/sampler.rs`).

/// Sampling settings of one request, already validated.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f32,
    /// 0 = off.
    pub top_k: i32,
    /// 0 or 1 = off.
    pub top_p: f32,
    /// 0 = off.
    pub min_p: f32,
    /// 0 or 1 = off.
    pub repeat_penalty: f32,
    /// 0 = off.
    pub presence_penalty: f32,
    /// 0 = off.
    pub frequency_penalty: f32,
    /// Seed of the random draw; random when absent.
    pub seed: Option<u64>,
}

impl SamplingParams {
    /// Whether any repetition penalty is on.
    pub fn has_penalties(&self) -> bool {
        (self.repeat_penalty != 0.0 && self.repeat_penalty != 1.0)
            || self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
    }
}

/// First index of the largest logit (ties go to the lowest id, as `torch.argmax`).
pub fn argmax(logits: &[f32]) -> i32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as i32
}

/// Log-probability of `token` and the `top` most likely tokens, under the
/// model's own distribution (softmax of the raw logits).
pub fn logprobs(logits: &[f32], token: i32, top: usize) -> (f32, Vec<(i32, f32)>) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_sum = logits
        .iter()
        .map(|&l| f64::from(l - max).exp())
        .sum::<f64>()
        .ln() as f32;
    let norm = |l: f32| l - max - log_sum;
    let chosen = norm(logits[token as usize]);
    if top == 0 {
        return (chosen, Vec::new());
    }
    let mut ids: Vec<usize> = (0..logits.len()).collect();
    let top = top.min(ids.len());
    ids.select_nth_unstable_by(top - 1, |&a, &b| logits[b].total_cmp(&logits[a]));
    ids.truncate(top);
    ids.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    (
        chosen,
        ids.into_iter()
            .map(|i| (i as i32, norm(logits[i])))
            .collect(),
    )
}

/// Turns token bytes into text that never splits a UTF-8 character and never
/// shows the start of a stop sequence before it is known not to be one.
#[derive(Debug, Default)]
pub struct TextStream {
    bytes: Vec<u8>,
    pending: String,
    stops: Vec<String>,
}

/// What one step of the stream released.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Released {
    /// Text safe to send now.
    pub text: String,
    /// A stop sequence matched; the text before it was released, the rest dropped.
    pub stopped: bool,
}

impl TextStream {
    /// A stream that ends at any of `stops` (empty strings ignored).
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            ..Self::default()
        }
    }

    /// Adds a token's bytes and returns what can be sent.
    pub fn push(&mut self, piece: &[u8]) -> Released {
        self.bytes.extend_from_slice(piece);
        let valid = match std::str::from_utf8(&self.bytes) {
            Ok(s) => s.len(),
            Err(e) if e.error_len().is_some() => {
                // Bytes that can never become a character: release them as U+FFFD
                // rather than holding the stream back forever.
                let text = String::from_utf8_lossy(&self.bytes).into_owned();
                self.bytes.clear();
                self.pending.push_str(&text);
                return self.release(false);
            }
            Err(e) => e.valid_up_to(),
        };
        let complete: Vec<u8> = self.bytes.drain(..valid).collect();
        self.pending
            .push_str(std::str::from_utf8(&complete).expect("checked above"));
        self.release(false)
    }

    /// Releases everything still held (end of generation).
    pub fn finish(&mut self) -> Released {
        if !self.bytes.is_empty() {
            let text = String::from_utf8_lossy(&self.bytes).into_owned();
            self.bytes.clear();
            self.pending.push_str(&text);
        }
        self.release(true)
    }

    fn release(&mut self, all: bool) -> Released {
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min()
        {
            let text = self.pending[..at].to_string();
            self.pending.clear();
            return Released {
                text,
                stopped: true,
            };
        }
        let keep = if all { 0 } else { self.held_suffix() };
        let cut = self.pending.len() - keep;
        let text = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        Released {
            text,
            stopped: false,
        }
    }

    /// Length of the longest suffix of the pending text that starts a stop sequence.
    fn held_suffix(&self) -> usize {
        self.stops
            .iter()
            .filter_map(|stop| {
                (1..stop.len())
                    .rev()
                    .filter(|&k| stop.is_char_boundary(k))
                    .find(|&k| self.pending.ends_with(&stop[..k]))
            })
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_is_never_split() {
        let mut s = TextStream::new(vec![]);
        let bytes = "é".as_bytes();
        assert_eq!(s.push(&bytes[..1]).text, "");
        assert_eq!(s.push(&bytes[1..]).text, "é");
    }

    #[test]
    fn stop_sequences_are_held_then_cut() {
        let mut s = TextStream::new(vec!["STOP".into()]);
        assert_eq!(s.push(b"abc ST").text, "abc ");
        let r = s.push(b"OP tail");
        assert_eq!(
            r,
            Released {
                text: String::new(),
                stopped: true
            }
        );
        let mut s = TextStream::new(vec!["STOP".into()]);
        assert_eq!(s.push(b"ST").text, "");
        assert_eq!(s.push(b"AR").text, "STAR");
    }

    #[test]
    fn a_four_byte_character_split_three_ways_comes_out_whole() {
        let mut s = TextStream::new(vec![]);
        let bytes = "a🦀b".as_bytes();
        assert_eq!(s.push(&bytes[..2]).text, "a");
        assert_eq!(s.push(&bytes[2..4]).text, "");
        assert_eq!(s.push(&bytes[4..]).text, "🦀b");
        assert_eq!(s.finish().text, "");
    }

    #[test]
    fn held_back_text_is_released_at_the_end() {
        let mut s = TextStream::new(vec!["STOP".into()]);
        assert_eq!(s.push(b"end ST").text, "end ");
        assert_eq!(s.finish().text, "ST");
    }

    #[test]
    fn the_earliest_of_several_stop_sequences_wins() {
        let mut s = TextStream::new(vec!["world".into(), "lo w".into()]);
        let r = s.push(b"hello world");
        assert!(r.stopped);
        assert_eq!(r.text, "hel");
    }

    #[test]
    fn logprobs_are_normalised_and_sorted() {
        let logits = [0.5f32, 1.0, 3.0, -2.0];
        let (chosen, top) = logprobs(&logits, 1, 4);
        assert_eq!(
            top.iter().map(|t| t.0).collect::<Vec<_>>(),
            vec![2, 1, 0, 3]
        );
        assert_eq!(chosen, top[1].1);
        let total: f32 = top.iter().map(|t| t.1.exp()).sum();
        assert!((total - 1.0).abs() < 1e-5, "{total}");
    }
}
