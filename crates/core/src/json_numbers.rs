//! Bounded digits in JSON numbers, so that a reply under a JSON format
//! always ends.
//!
//! llguidance's number lexeme has no bound on its digits: at temperature 1
//! a model can write `777.444444…` until `max_new_tokens`, and the reply
//! ends by LENGTH, invalid. llama.cpp's JSON-Schema grammar bounds each
//! part of a number to 16 digits (`integral-part`, `decimal-part`); the
//! same bound is applied here on top of the format's mask: outside strings,
//! a number's integral part and fraction take at most [`MAX_DIGITS`] digits
//! each. Its exponent takes at most [`MAX_EXPONENT_DIGITS`]: with 16 there
//! (llama.cpp's choice) a reply at temperature 1 wrote `2222e2222222222222222`,
//! which JSON parsers read as a double refuse (serde_json: "number out of
//! range") or turn into infinity (Python). Strings are not bounded (only
//! their `maxLength` bounds them).

/// Most digits in the integral part, and in the fraction, of a number.
pub(crate) const MAX_DIGITS: u8 = 16;

/// Most digits in a number's exponent: every number then stays within a
/// double's range (at most 9999999999999999.9999999999999999e99).
pub(crate) const MAX_EXPONENT_DIGITS: u8 = 2;

/// Where the reply's JSON text stands, as far as digits are concerned.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
enum Part {
    /// Between tokens of JSON: not in a string or a number.
    #[default]
    Outside,
    InString,
    /// After a backslash in a string.
    Escape,
    /// Digits of the integral part so far (0 right after a `-`).
    Integral(u8),
    Fraction(u8),
    /// Right after `e` or `E`.
    ExponentStart,
    Exponent(u8),
}

/// The JSON text's state, fed the reply's bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct NumberDigits {
    part: Part,
}

impl NumberDigits {
    /// Whether the text is inside a number, where the next digit counts.
    pub(crate) fn in_number(&self) -> bool {
        matches!(
            self.part,
            Part::Integral(_) | Part::Fraction(_) | Part::ExponentStart | Part::Exponent(_)
        )
    }

    /// Feeds `bytes`; false if a number part would pass [`MAX_DIGITS`]
    /// (the state is then unspecified).
    pub(crate) fn feed(&mut self, bytes: &[u8]) -> bool {
        bytes.iter().all(|&b| self.byte(b))
    }

    fn byte(&mut self, b: u8) -> bool {
        let digit = b.is_ascii_digit();
        let count = |n: u8| (n < MAX_DIGITS).then_some(n + 1);
        let exponent = |n: u8| (n < MAX_EXPONENT_DIGITS).then_some(n + 1);
        let next = match (self.part, b) {
            (Part::InString, b'\\') => Some(Part::Escape),
            (Part::InString, b'"') => Some(Part::Outside),
            (Part::InString, _) | (Part::Escape, _) => Some(Part::InString),
            (Part::Integral(n), _) if digit => count(n).map(Part::Integral),
            (Part::Integral(_), b'.') => Some(Part::Fraction(0)),
            (Part::Fraction(n), _) if digit => count(n).map(Part::Fraction),
            (Part::Integral(_) | Part::Fraction(_), b'e' | b'E') => Some(Part::ExponentStart),
            (Part::ExponentStart, b'+' | b'-') => Some(Part::Exponent(0)),
            (Part::ExponentStart, _) if digit => Some(Part::Exponent(1)),
            (Part::Exponent(n), _) if digit => exponent(n).map(Part::Exponent),
            // Anything else ends a number: the byte is read as outside one.
            (_, b'"') => Some(Part::InString),
            (_, b'-') => Some(Part::Integral(0)),
            (_, _) if digit => Some(Part::Integral(1)),
            (_, _) => Some(Part::Outside),
        };
        match next {
            Some(part) => {
                self.part = part;
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fits(text: &str) -> bool {
        NumberDigits::default().feed(text.as_bytes())
    }

    #[test]
    fn a_number_takes_sixteen_digits_a_part_and_two_in_its_exponent() {
        let sixteen = "1234567890123456";
        assert!(fits(&format!("{{\"total\": {sixteen}.{sixteen}e-99}}")));
        assert!(!fits(&format!("{{\"total\": {sixteen}7}}")));
        assert!(!fits(&format!("[-0.{sixteen}4]")));
        assert!(!fits("[1E+100]"));
        assert!(!fits("[2222e2222]"));
        // The largest number it lets through is a double.
        let largest = format!("{}.{}e99", "9".repeat(16), "9".repeat(16));
        assert!(fits(&largest));
        assert!(largest.parse::<f64>().unwrap().is_finite());
        // The runaway reply.
        assert!(!fits("{\"total\": 777.444444444444444444444444485444444"));
    }

    #[test]
    fn strings_and_separate_numbers_are_not_counted_together() {
        let long = "9".repeat(100);
        assert!(fits(&format!("{{\"{long}\": \"{long}\\\"{long}\"}}")));
        assert!(fits(&format!("[{}, {}]", &long[..16], &long[..16])));
        assert!(fits("{\"a\": \"\\u1234\", \"b\": -12}"));
    }

    #[test]
    fn the_state_says_when_a_digit_counts() {
        let mut s = NumberDigits::default();
        assert!(s.feed(b"{\"n\": 12"));
        assert!(s.in_number());
        assert!(s.feed(b", \"s\": \"4"));
        assert!(!s.in_number());
        assert!(s.feed(b"\", \"e\": 1e"));
        assert!(s.in_number());
    }
}
