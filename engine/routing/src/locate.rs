//! Finding the line a name is on in `routes.lua`.
//!
//! A Lua table keeps no source positions, so a configuration error found in the evaluated table
//! (an unknown key, an endpoint no one declared) is placed by reading the source: a small
//! tokenizer that knows Lua's comments, short and long strings and numbers, so a key inside a
//! comment or a string is never taken for the one in the table. The first matching token at or
//! after a given line wins; a table built by code may name nothing in the source, and then the
//! error has no line.

/// A token of interest: a name, or a string literal's contents, with the line it starts on.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Name(String),
    Str(String),
    Sym(u8),
    /// `==`, `~=`, `<=`, `>=`, `..`, `::` and the like: never a field's `=`.
    Op,
}

/// The tokens of a Lua source, for locating names in it.
pub struct Locator {
    toks: Vec<(Tok, u32)>,
}

impl Locator {
    pub fn new(src: &str) -> Self {
        Locator { toks: tokens(src) }
    }

    /// The line of the first field `key = …` (or `["key"] = …`) at or after line `from`.
    pub fn key(&self, key: &str, from: u32) -> Option<u32> {
        let t = &self.toks;
        for i in 0..t.len() {
            if t[i].1 < from {
                continue;
            }
            let named = matches!(&t[i].0, Tok::Name(n) if n == key)
                && matches!(t.get(i + 1), Some((Tok::Sym(b'='), _)));
            let bracketed = matches!(&t[i].0, Tok::Str(s) if s == key)
                && i > 0
                && t[i - 1].0 == Tok::Sym(b'[')
                && matches!(t.get(i + 1), Some((Tok::Sym(b']'), _)))
                && matches!(t.get(i + 2), Some((Tok::Sym(b'='), _)));
            if named || bracketed {
                return Some(t[i].1);
            }
        }
        None
    }

    /// The line of the first string literal equal to `s` at or after line `from`.
    pub fn string(&self, s: &str, from: u32) -> Option<u32> {
        self.toks
            .iter()
            .find(|(t, line)| *line >= from && matches!(t, Tok::Str(x) if x == s))
            .map(|(_, line)| *line)
    }
}

fn tokens(src: &str) -> Vec<(Tok, u32)> {
    let b = src.as_bytes();
    let mut out = Vec::new();
    let mut line = 1u32;
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        match c {
            b'\n' => {
                line += 1;
                i += 1;
            }
            b'-' if b.get(i + 1) == Some(&b'-') => {
                i += 2;
                if let Some(level) = long_bracket(b, i) {
                    let (_, next, lines) = long_body(b, i, level);
                    line += lines;
                    i = next;
                } else {
                    while i < b.len() && b[i] != b'\n' {
                        i += 1;
                    }
                }
            }
            b'[' if long_bracket(b, i).is_some() => {
                let level = long_bracket(b, i).unwrap_or(0);
                let start = line;
                let (text, next, lines) = long_body(b, i, level);
                out.push((Tok::Str(text), start));
                line += lines;
                i = next;
            }
            b'"' | b'\'' => {
                let start = line;
                let (text, next, lines) = short_string(b, i);
                out.push((Tok::Str(text), start));
                line += lines;
                i = next;
            }
            c if c == b'_' || c.is_ascii_alphabetic() => {
                let s = i;
                while i < b.len() && (b[i] == b'_' || b[i].is_ascii_alphanumeric()) {
                    i += 1;
                }
                out.push((Tok::Name(src[s..i].to_string()), line));
            }
            c if c.is_ascii_digit() => {
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.') {
                    i += 1;
                }
            }
            b'=' | b'~' | b'<' | b'>' | b'.' | b':' | b'/'
                if b.get(i + 1) == Some(&c) || b.get(i + 1) == Some(&b'=') =>
            {
                out.push((Tok::Op, line));
                i += 2;
            }
            c if c.is_ascii_whitespace() => i += 1,
            c => {
                out.push((Tok::Sym(c), line));
                i += 1;
            }
        }
    }
    out
}

/// The level of a long bracket opening at `i` (`[[` is 0, `[==[` is 2), if one does.
fn long_bracket(b: &[u8], i: usize) -> Option<usize> {
    if b.get(i) != Some(&b'[') {
        return None;
    }
    let mut j = i + 1;
    while b.get(j) == Some(&b'=') {
        j += 1;
    }
    (b.get(j) == Some(&b'[')).then_some(j - i - 1)
}

/// A long string or comment opened at `i`: its text, the index after it and the newlines in it.
fn long_body(b: &[u8], i: usize, level: usize) -> (String, usize, u32) {
    let start = i + level + 2;
    let mut close = Vec::with_capacity(level + 2);
    close.push(b']');
    close.extend(std::iter::repeat_n(b'=', level));
    close.push(b']');
    let end = b[start.min(b.len())..]
        .windows(close.len())
        .position(|w| w == close.as_slice())
        .map_or(b.len(), |p| start + p);
    let body = &b[start.min(end)..end];
    let lines = body.iter().filter(|&&c| c == b'\n').count() as u32;
    // Lua drops a newline right after the opening bracket.
    let text = body.strip_prefix(b"\n").unwrap_or(body);
    (
        String::from_utf8_lossy(text).into_owned(),
        (end + close.len()).min(b.len()),
        lines,
    )
}

/// A quoted string opened at `i`: its text (the common escapes decoded), the index after it and
/// the newlines it spans (`\` before a newline continues it).
fn short_string(b: &[u8], i: usize) -> (String, usize, u32) {
    let quote = b[i];
    let mut out = Vec::new();
    let mut lines = 0;
    let mut j = i + 1;
    while j < b.len() && b[j] != quote {
        match b[j] {
            b'\\' if j + 1 < b.len() => {
                let e = b[j + 1];
                out.push(match e {
                    b'n' => b'\n',
                    b't' => b'\t',
                    b'\n' => {
                        lines += 1;
                        b'\n'
                    }
                    other => other,
                });
                j += 2;
            }
            b'\n' => {
                // An unfinished string: Lua refuses it; stop here.
                break;
            }
            c => {
                out.push(c);
                j += 1;
            }
        }
    }
    (String::from_utf8_lossy(&out).into_owned(), j + 1, lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC: &str = r#"-- a comment naming colour = 1
return {
  endpoints = {
    events = { kind = "builtin" },  -- "alerts" in a comment
    --[[ colour = "x"
         routes = {} ]]
    alerts = { kind = "webhook", url = [[http://x/
]] },
  },
  routes = {
    { name = "hot", condition = "a == 'b'", endpoints = { "alerts" } },
    { name = "cold", colour = 1, endpoints = { "nowhere" } },
    ["quoted key"] = 2,
  },
  x = a == b,
}
"#;

    #[test]
    fn keys_and_strings_are_found_outside_comments_and_strings() {
        let l = Locator::new(SRC);
        assert_eq!(l.key("endpoints", 1), Some(3));
        assert_eq!(l.key("colour", 1), Some(12), "not the comments' colour");
        assert_eq!(
            l.key("routes", 1),
            Some(10),
            "not the one in the long comment"
        );
        assert_eq!(l.string("alerts", 1), Some(11), "not the one in a comment");
        assert_eq!(l.string("nowhere", 1), Some(12));
        assert_eq!(l.key("endpoints", 11), Some(11), "searched from a line");
        assert_eq!(l.key("quoted key", 1), Some(13));
        assert_eq!(l.key("x", 1), Some(15));
        assert_eq!(l.key("a", 1), None, "a == b is no field");
        assert_eq!(l.key("missing", 1), None);
        assert_eq!(l.string("http://x/\n", 1), Some(7));
    }

    #[test]
    fn unfinished_input_does_not_panic() {
        for src in ["--[[", "[==[", "'abc", "\"a\\", "[", "--", "x ="] {
            let _ = Locator::new(src).key("x", 1);
        }
    }
}
