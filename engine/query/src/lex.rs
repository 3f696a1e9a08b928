//! Tokens of the query language. Keywords are not tokens of their own: the parser recognises
//! them by case-insensitive comparison where the grammar allows one, so a property called
//! `status` or `count` stays a name.

use crate::QueryError;

#[derive(Debug, Clone, PartialEq)]
pub enum Tok {
    /// A name: letters, digits and `_`, with `$` allowed at its start (`$body`, `$twin`).
    /// Other keys are written in brackets: `tags['floor-2']`.
    Name(String),
    Str(String),
    Num(f64),
    LParen,
    RParen,
    LBracket,
    RBracket,
    Comma,
    Dot,
    Star,
    Plus,
    Minus,
    Slash,
    Percent,
    Eq,
    Ne,
    Lt,
    Gt,
    Le,
    Ge,
}

/// A token and the byte offset it starts at (for error messages).
#[derive(Debug, Clone, PartialEq)]
pub struct Token {
    pub tok: Tok,
    pub at: usize,
}

pub fn tokens(src: &str) -> Result<Vec<Token>, QueryError> {
    let bytes = src.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        let at = i;
        let simple = match c {
            b' ' | b'\t' | b'\r' | b'\n' => {
                i += 1;
                continue;
            }
            b'(' => Some(Tok::LParen),
            b')' => Some(Tok::RParen),
            b'[' => Some(Tok::LBracket),
            b']' => Some(Tok::RBracket),
            b',' => Some(Tok::Comma),
            b'.' if !bytes.get(i + 1).is_some_and(u8::is_ascii_digit) => Some(Tok::Dot),
            b'*' => Some(Tok::Star),
            b'+' => Some(Tok::Plus),
            b'-' => Some(Tok::Minus),
            b'/' => Some(Tok::Slash),
            b'%' => Some(Tok::Percent),
            b'=' => Some(Tok::Eq),
            _ => None,
        };
        if let Some(tok) = simple {
            out.push(Token { tok, at });
            i += 1;
            continue;
        }
        let two = |n: u8| bytes.get(i + 1) == Some(&n);
        let tok = match c {
            b'!' if two(b'=') => {
                i += 2;
                Tok::Ne
            }
            b'<' if two(b'>') => {
                i += 2;
                Tok::Ne
            }
            b'<' if two(b'=') => {
                i += 2;
                Tok::Le
            }
            b'>' if two(b'=') => {
                i += 2;
                Tok::Ge
            }
            b'<' => {
                i += 1;
                Tok::Lt
            }
            b'>' => {
                i += 1;
                Tok::Gt
            }
            b'\'' | b'"' => {
                let (s, next) = string(src, i)?;
                i = next;
                Tok::Str(s)
            }
            b'0'..=b'9' | b'.' => {
                let (n, next) = number(src, i)?;
                i = next;
                Tok::Num(n)
            }
            c if c == b'$' || c == b'_' || c.is_ascii_alphabetic() => {
                let start = i;
                i += 1;
                while i < bytes.len() && (bytes[i] == b'_' || bytes[i].is_ascii_alphanumeric()) {
                    i += 1;
                }
                // The routing conditions' `$dt-dataschema` and `$dt-subject` are names with a
                // hyphen (wire spec §6); anywhere else `-` is the minus sign.
                if src[start..i].eq_ignore_ascii_case("$dt") && bytes.get(i) == Some(&b'-') {
                    i += 1;
                    while i < bytes.len() && (bytes[i] == b'_' || bytes[i].is_ascii_alphanumeric())
                    {
                        i += 1;
                    }
                }
                Tok::Name(src[start..i].to_string())
            }
            _ => {
                let ch = src[i..].chars().next().unwrap_or('?');
                return Err(QueryError::new(at, format!("unexpected character '{ch}'")));
            }
        };
        out.push(Token { tok, at });
    }
    Ok(out)
}

/// A quoted string from `at` (its opening quote): the text and the offset after the closing one.
fn string(src: &str, at: usize) -> Result<(String, usize), QueryError> {
    let quote = src.as_bytes()[at] as char;
    let mut out = String::new();
    let mut chars = src[at + 1..].char_indices();
    while let Some((off, c)) = chars.next() {
        let pos = at + 1 + off;
        match c {
            c if c == quote => return Ok((out, pos + 1)),
            '\\' => {
                let Some((_, e)) = chars.next() else { break };
                match e {
                    '\'' | '"' | '\\' | '/' => out.push(e),
                    'b' => out.push('\u{8}'),
                    'f' => out.push('\u{c}'),
                    'n' => out.push('\n'),
                    'r' => out.push('\r'),
                    't' => out.push('\t'),
                    'u' => {
                        let hex: String = chars.by_ref().take(4).map(|(_, c)| c).collect();
                        let code = (hex.len() == 4)
                            .then(|| u32::from_str_radix(&hex, 16).ok())
                            .flatten()
                            .and_then(char::from_u32)
                            .ok_or_else(|| {
                                QueryError::new(pos, "\\u must be followed by 4 hex digits")
                            })?;
                        out.push(code);
                    }
                    other => return Err(QueryError::new(pos, format!("unknown escape \\{other}"))),
                }
            }
            c => out.push(c),
        }
    }
    Err(QueryError::new(at, "unterminated string"))
}

/// A decimal (`12`, `-` is an operator, `1.5`, `.5`, `2e3`) or `0x` hex number.
fn number(src: &str, at: usize) -> Result<(f64, usize), QueryError> {
    let bytes = src.as_bytes();
    if bytes[at] == b'0' && matches!(bytes.get(at + 1), Some(b'x' | b'X')) {
        let mut end = at + 2;
        while end < bytes.len() && bytes[end].is_ascii_hexdigit() {
            end += 1;
        }
        return u64::from_str_radix(&src[at + 2..end], 16)
            .map(|n| (n as f64, end))
            .map_err(|_| QueryError::new(at, "bad hex number"));
    }
    let mut end = at;
    while end < bytes.len() && (bytes[end].is_ascii_digit() || bytes[end] == b'.') {
        end += 1;
    }
    if end < bytes.len() && matches!(bytes[end], b'e' | b'E') {
        let mut e = end + 1;
        if e < bytes.len() && matches!(bytes[e], b'+' | b'-') {
            e += 1;
        }
        if e < bytes.len() && bytes[e].is_ascii_digit() {
            while e < bytes.len() && bytes[e].is_ascii_digit() {
                e += 1;
            }
            end = e;
        }
    }
    src[at..end]
        .parse::<f64>()
        .map(|n| (n, end))
        .map_err(|_| QueryError::new(at, format!("bad number '{}'", &src[at..end])))
}
