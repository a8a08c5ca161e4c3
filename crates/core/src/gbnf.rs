//! llama.cpp's GBNF grammars, rewritten into the Lark-like syntax llguidance
//! compiles. llguidance reads Lark, not GBNF, and no crate converts one into
//! the other (llguidance ships only a Python script for it), so this is a
//! small tokenizer over GBNF's few constructs:
//! - `name ::= alternatives`, `root` being the start rule;
//! - `"literals"` and `[character classes]` with GBNF's escapes, `.`;
//! - groups, `|`, `*`, `+`, `?`, `{m}`, `{m,}`, `{m,n}`, `{,n}`;
//! - `#` comments.
//!
//! Every rule is written on one line, so GBNF's line rules (a newline ends a
//! rule outside parentheses) need no counterpart.

use std::fmt::Write;

/// The Lark grammar of a GBNF grammar, or what is wrong with it (with its
/// line and column).
pub fn to_lark(gbnf: &str) -> Result<String, String> {
    let tokens = tokenize(gbnf)?;
    let mut rules: Vec<(String, Vec<Token>)> = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        let (Token::Name(name), Some(Token::Defines)) =
            (&tokens[i].0, tokens.get(i + 1).map(|t| &t.0))
        else {
            return Err(at(&tokens[i], "expected a rule: `name ::= ...`"));
        };
        let mut body = Vec::new();
        i += 2;
        while i < tokens.len() {
            if matches!(tokens[i].0, Token::Name(_))
                && matches!(tokens.get(i + 1).map(|t| &t.0), Some(Token::Defines))
            {
                break;
            }
            if tokens[i].0 == Token::Defines {
                return Err(at(&tokens[i], "`::=` without a rule name before it"));
            }
            body.push(tokens[i].0.clone());
            i += 1;
        }
        if body.is_empty() {
            return Err(format!("rule `{name}` is empty"));
        }
        if rules.iter().any(|(n, _)| n == name) {
            return Err(format!("rule `{name}` is defined twice"));
        }
        rules.push((name.clone(), body));
    }
    if !rules.iter().any(|(n, _)| n == "root") {
        return Err("no `root` rule".into());
    }
    let mut lark = String::new();
    for (name, body) in &rules {
        write!(lark, "{}:", rule_name(name)).expect("writing to a String");
        let mut depth = 0i32;
        for token in body {
            // Postfix operators stay against what they apply to.
            if !matches!(
                token,
                Token::Star | Token::Plus | Token::Optional | Token::Repeat(..)
            ) {
                lark.push(' ');
            }
            match token {
                Token::Name(n) => {
                    if !rules.iter().any(|(r, _)| r == n) {
                        return Err(format!("rule `{name}` refers to undefined rule `{n}`"));
                    }
                    lark.push_str(&rule_name(n));
                }
                Token::Literal(s) => {
                    lark.push_str(&serde_json::to_string(s).expect("a string serializes"))
                }
                Token::Class { negated, items } => {
                    lark.push_str("/[");
                    if *negated {
                        lark.push('^');
                    }
                    for &(lo, hi) in items {
                        write!(lark, "\\x{{{:x}}}", lo as u32).expect("writing to a String");
                        if hi != lo {
                            write!(lark, "-\\x{{{:x}}}", hi as u32).expect("writing to a String");
                        }
                    }
                    lark.push_str("]/");
                }
                Token::Any => lark.push_str("/(?s:.)/"),
                Token::Open => {
                    depth += 1;
                    lark.push('(');
                }
                Token::Close => {
                    depth -= 1;
                    if depth < 0 {
                        return Err(format!("rule `{name}`: `)` without `(`"));
                    }
                    lark.push(')');
                }
                Token::Alt => lark.push('|'),
                Token::Star => lark.push('*'),
                Token::Plus => lark.push('+'),
                Token::Optional => lark.push('?'),
                Token::Repeat(min, max) => match max {
                    Some(max) => write!(lark, "{{{min},{max}}}").expect("writing to a String"),
                    None => write!(lark, "{{{min},}}").expect("writing to a String"),
                },
                Token::Defines => unreachable!("split out above"),
            }
        }
        if depth != 0 {
            return Err(format!("rule `{name}`: `(` without `)`"));
        }
        lark.push('\n');
    }
    Ok(lark)
}

/// A Lark rule name for a GBNF one: Lark's are lower case, GBNF's may hold
/// capitals and `-`, so both are spelled out (`A` as `_a`, `-` as `__`),
/// which keeps distinct names distinct.
fn rule_name(gbnf: &str) -> String {
    if gbnf == "root" {
        return "start".into();
    }
    let mut out = String::from("r_");
    for c in gbnf.chars() {
        match c {
            '-' => out.push_str("__"),
            c if c.is_ascii_uppercase() => {
                out.push('_');
                out.push(c.to_ascii_lowercase());
            }
            c => out.push(c),
        }
    }
    out
}

#[derive(Clone, Debug, PartialEq)]
enum Token {
    Name(String),
    Defines,
    Literal(String),
    Class {
        negated: bool,
        items: Vec<(char, char)>,
    },
    Any,
    Open,
    Close,
    Alt,
    Star,
    Plus,
    Optional,
    Repeat(u32, Option<u32>),
}

/// A token and where it starts (line, column; both from 1).
type Placed = (Token, usize, usize);

fn at(token: &Placed, message: &str) -> String {
    format!("line {} column {}: {message}", token.1, token.2)
}

fn is_word(c: char) -> bool {
    // llama.cpp's is_word_char: no underscore.
    c.is_ascii_alphanumeric() || c == '-'
}

fn tokenize(src: &str) -> Result<Vec<Placed>, String> {
    let chars: Vec<char> = src.chars().collect();
    let mut out = Vec::new();
    let (mut i, mut line, mut col) = (0, 1, 1);
    let err = |line: usize, col: usize, m: &str| format!("line {line} column {col}: {m}");
    while i < chars.len() {
        let c = chars[i];
        let (start_line, start_col) = (line, col);
        let start = i;
        let token = match c {
            '\n' => {
                i += 1;
                line += 1;
                col = 1;
                continue;
            }
            c if c.is_whitespace() => {
                i += 1;
                col += 1;
                continue;
            }
            '#' => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
                continue;
            }
            ':' if chars.get(i + 1) == Some(&':') && chars.get(i + 2) == Some(&'=') => {
                i += 3;
                Token::Defines
            }
            '"' => {
                i += 1;
                let mut s = String::new();
                loop {
                    match chars.get(i) {
                        None | Some('\n') => {
                            return Err(err(start_line, start_col, "unterminated string"))
                        }
                        Some('"') => {
                            i += 1;
                            break;
                        }
                        Some('\\') => {
                            let (ch, next) = escape(&chars, i)
                                .map_err(|m| err(start_line, start_col + i - start, &m))?;
                            s.push(ch);
                            i = next;
                        }
                        Some(&ch) => {
                            s.push(ch);
                            i += 1;
                        }
                    }
                }
                Token::Literal(s)
            }
            '[' => {
                i += 1;
                let negated = chars.get(i) == Some(&'^');
                if negated {
                    i += 1;
                }
                let mut items = Vec::new();
                loop {
                    let lo = match chars.get(i) {
                        None | Some('\n') => {
                            return Err(err(start_line, start_col, "unterminated character class"))
                        }
                        Some(']') => {
                            i += 1;
                            break;
                        }
                        _ => class_char(&chars, &mut i)
                            .map_err(|m| err(start_line, start_col, &m))?,
                    };
                    let hi = if chars.get(i) == Some(&'-') && chars.get(i + 1) != Some(&']') {
                        i += 1;
                        class_char(&chars, &mut i).map_err(|m| err(start_line, start_col, &m))?
                    } else {
                        lo
                    };
                    if hi < lo {
                        return Err(err(start_line, start_col, "a range runs backwards"));
                    }
                    items.push((lo, hi));
                }
                if items.is_empty() {
                    return Err(err(start_line, start_col, "empty character class"));
                }
                Token::Class { negated, items }
            }
            '{' => {
                let close = chars[i..]
                    .iter()
                    .position(|&c| c == '}')
                    .ok_or_else(|| err(start_line, start_col, "unterminated `{`"))?;
                let inner: String = chars[i + 1..i + close].iter().collect();
                i += close + 1;
                repeat(inner.trim()).map_err(|m| err(start_line, start_col, &m))?
            }
            '.' => {
                i += 1;
                Token::Any
            }
            '(' | ')' | '|' | '*' | '+' | '?' => {
                i += 1;
                match c {
                    '(' => Token::Open,
                    ')' => Token::Close,
                    '|' => Token::Alt,
                    '*' => Token::Star,
                    '+' => Token::Plus,
                    _ => Token::Optional,
                }
            }
            c if is_word(c) => {
                while i < chars.len() && is_word(chars[i]) {
                    i += 1;
                }
                Token::Name(chars[start..i].iter().collect())
            }
            c => {
                return Err(err(
                    start_line,
                    start_col,
                    &format!("unexpected character {c:?}"),
                ))
            }
        };
        col += i - start;
        out.push((token, start_line, start_col));
    }
    if out.is_empty() {
        return Err("the grammar is empty".into());
    }
    Ok(out)
}

/// One character of a class, escaped or not, advancing `i`.
fn class_char(chars: &[char], i: &mut usize) -> Result<char, String> {
    match chars.get(*i) {
        Some('\\') => {
            let (c, next) = escape(chars, *i)?;
            *i = next;
            Ok(c)
        }
        Some(&c) => {
            *i += 1;
            Ok(c)
        }
        None => Err("unterminated character class".into()),
    }
}

/// The character of the escape at `chars[i]` (a `\`) and the index after it.
fn escape(chars: &[char], i: usize) -> Result<(char, usize), String> {
    let hex = |digits: usize| -> Result<(char, usize), String> {
        let s: String = chars
            .get(i + 2..i + 2 + digits)
            .unwrap_or(&[])
            .iter()
            .collect();
        let code = u32::from_str_radix(&s, 16)
            .ok()
            .filter(|_| s.len() == digits)
            .ok_or_else(|| format!("bad escape `\\{}{s}`", chars[i + 1]))?;
        let c = char::from_u32(code).ok_or_else(|| format!("bad code point {code:#x}"))?;
        Ok((c, i + 2 + digits))
    };
    match chars.get(i + 1) {
        Some('x') => hex(2),
        Some('u') => hex(4),
        Some('U') => hex(8),
        Some('t') => Ok(('\t', i + 2)),
        Some('r') => Ok(('\r', i + 2)),
        Some('n') => Ok(('\n', i + 2)),
        Some(&c @ ('\\' | '"' | '[' | ']' | '-' | '^')) => Ok((c, i + 2)),
        Some(c) => Err(format!("unknown escape `\\{c}`")),
        None => Err("a `\\` ends the grammar".into()),
    }
}

/// `{m}`, `{m,}`, `{m,n}` or `{,n}`.
fn repeat(inner: &str) -> Result<Token, String> {
    let number = |s: &str| {
        s.trim()
            .parse::<u32>()
            .map_err(|_| format!("bad repetition `{{{inner}}}`"))
    };
    let token = match inner.split_once(',') {
        None => {
            let n = number(inner)?;
            Token::Repeat(n, Some(n))
        }
        Some((min, max)) => {
            let min = if min.trim().is_empty() {
                0
            } else {
                number(min)?
            };
            let max = if max.trim().is_empty() {
                None
            } else {
                Some(number(max)?)
            };
            if max.is_some_and(|max| max < min) {
                return Err(format!("bad repetition `{{{inner}}}`: max below min"));
            }
            Token::Repeat(min, max)
        }
    };
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_literals_and_operators_become_lark() {
        let lark = to_lark(
            "# a comment\nroot ::= answer (\", \" answer)*\nanswer ::= \"yes\" | \"no\" | Count-Of\nCount-Of ::= [0-9]{1,3} \"x\"?\n",
        )
        .unwrap();
        assert_eq!(
            lark,
            "start: r_answer ( \", \" r_answer )*\n\
             r_answer: \"yes\" | \"no\" | r__count___of\n\
             r__count___of: /[\\x{30}-\\x{39}]/{1,3} \"x\"?\n"
        );
    }

    #[test]
    fn escapes_are_decoded_and_requoted() {
        let lark = to_lark(r#"root ::= "a\"b\\c\n\x41\u00e9" [^\]\-a] ."#).unwrap();
        assert_eq!(
            lark,
            "start: \"a\\\"b\\\\c\\nAé\" /[^\\x{5d}\\x{2d}\\x{61}]/ /(?s:.)/\n"
        );
    }

    #[test]
    fn a_rule_may_span_lines_inside_parentheses() {
        let lark = to_lark("root ::= (\n  \"a\" |\n  \"b\"\n)\nother ::= \"c\"").unwrap();
        assert_eq!(lark, "start: ( \"a\" | \"b\" )\nr_other: \"c\"\n");
    }

    #[test]
    fn open_ended_and_upper_bounded_repetitions() {
        assert_eq!(to_lark("root ::= \"a\"{2,}").unwrap(), "start: \"a\"{2,}\n");
        assert_eq!(
            to_lark("root ::= \"a\"{,4}").unwrap(),
            "start: \"a\"{0,4}\n"
        );
        assert_eq!(to_lark("root ::= \"a\"{3}").unwrap(), "start: \"a\"{3,3}\n");
    }

    #[test]
    fn distinct_names_stay_distinct() {
        let names = ["a-b", "aB", "ab", "A", "a", "-a", "a-", "A-", "--", "root-"];
        let mapped: std::collections::HashSet<String> =
            names.iter().map(|n| rule_name(n)).collect();
        assert_eq!(mapped.len(), names.len());
        assert_eq!(rule_name("root"), "start");
    }

    #[test]
    fn broken_grammars_are_refused_with_a_reason() {
        let cases = [
            ("", "empty"),
            ("start ::= \"a\"", "no `root` rule"),
            ("root ::= other", "undefined rule `other`"),
            ("root ::= \"a", "unterminated string"),
            ("root ::= [a-", "unterminated character class"),
            ("root ::= [z-a]", "backwards"),
            ("root ::= ( \"a\"", "`(` without `)`"),
            ("root ::= \"a\" )", "`)` without `(`"),
            ("root ::= \"a\"{3,1}", "max below min"),
            ("root ::= \"\\q\"", "unknown escape"),
            ("root ::= \"a\"\nroot ::= \"b\"", "defined twice"),
            ("root ::=", "is empty"),
            ("\"a\" ::= root", "expected a rule"),
            ("root ::= \"a\" ; ", "unexpected character ';'"),
        ];
        for (grammar, want) in cases {
            let error = to_lark(grammar).unwrap_err();
            assert!(error.contains(want), "{grammar:?}: {error}");
        }
    }
}
