//! Reading Rust source just well enough for the tidy checks: comments and string literals blanked
//! out (so that neither is mistaken for code), the part of a file before its test module,
//! functions with their lengths, and `unsafe` sites with the comment above them.

/// `text` with every comment and the contents of every string and char literal replaced by
/// spaces; newlines are kept, so line numbers stay the same.
pub fn blank(text: &str) -> String {
    let mut l = Lexer { c: text.chars().collect(), i: 0, out: String::with_capacity(text.len()) };
    while l.i < l.c.len() {
        let (ch, next) = (l.c[l.i], l.c.get(l.i + 1).copied());
        match ch {
            '/' if next == Some('/') => l.line_comment(),
            '/' if next == Some('*') => l.block_comment(),
            'r' if matches!(next, Some('"' | '#')) && !ident_before(&l.c, l.i) => l.raw_string(),
            '"' => l.quoted('"'),
            '\'' if is_char_literal(&l.c, l.i) => l.quoted('\''),
            _ => l.keep(),
        }
    }
    l.out
}

struct Lexer {
    c: Vec<char>,
    i: usize,
    out: String,
}

impl Lexer {
    fn keep(&mut self) {
        self.out.push(self.c[self.i]);
        self.i += 1;
    }

    /// Replaces the next `n` characters with spaces, keeping newlines.
    fn blank(&mut self, n: usize) {
        for _ in 0..n {
            if let Some(&ch) = self.c.get(self.i) {
                self.out.push(if ch == '\n' { '\n' } else { ' ' });
                self.i += 1;
            }
        }
    }

    fn line_comment(&mut self) {
        while self.i < self.c.len() && self.c[self.i] != '\n' {
            self.blank(1);
        }
    }

    fn block_comment(&mut self) {
        let mut depth = 0;
        while self.i < self.c.len() {
            let two = (self.c[self.i], self.c.get(self.i + 1).copied());
            if two == ('/', Some('*')) {
                depth += 1;
                self.blank(2);
            } else if two == ('*', Some('/')) {
                depth -= 1;
                self.blank(2);
                if depth == 0 {
                    return;
                }
            } else {
                self.blank(1);
            }
        }
    }

    /// r"…", r#"…"#, …; a lone `r#ident` is kept.
    fn raw_string(&mut self) {
        let mut j = self.i + 1;
        while self.c.get(j) == Some(&'#') {
            j += 1;
        }
        if self.c.get(j) != Some(&'"') {
            return self.keep();
        }
        let hashes = j - self.i - 1;
        self.blank(j - self.i + 1);
        while self.i < self.c.len() {
            if self.c[self.i] == '"' && (0..hashes).all(|h| self.c.get(self.i + 1 + h) == Some(&'#')) {
                return self.blank(hashes + 1);
            }
            self.blank(1);
        }
    }

    /// A string or char literal, with its escapes.
    fn quoted(&mut self, quote: char) {
        self.blank(1);
        while self.i < self.c.len() && self.c[self.i] != quote {
            let escape = self.c[self.i] == '\\';
            self.blank(if escape { 2 } else { 1 });
        }
        self.blank(1);
    }
}

fn ident_before(c: &[char], i: usize) -> bool {
    i > 0 && (c[i - 1].is_alphanumeric() || c[i - 1] == '_')
}

/// `'x'`, `'\n'`, `'\u{1F600}'` — not a lifetime (`'a`) or a loop label.
fn is_char_literal(c: &[char], i: usize) -> bool {
    matches!((c.get(i + 1), c.get(i + 2)), (Some('\\'), _) | (Some(_), Some('\'')))
}

/// The lines of `blanked` before its test module (`#[cfg(test)]` followed by `mod`), so checks of
/// shipped code skip test code kept in the same file.
pub fn code_lines(blanked: &str) -> Vec<&str> {
    let lines: Vec<&str> = blanked.lines().collect();
    for (i, l) in lines.iter().enumerate() {
        if l.trim() == "#[cfg(test)]" && lines.get(i + 1).is_some_and(|n| n.trim_start().starts_with("mod ")) {
            return lines[..i].to_vec();
        }
    }
    lines
}

/// A function with a body: its name, its first line (1-based) and its length in lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Function {
    pub name: String,
    pub line: usize,
    pub len: usize,
}

/// The functions with bodies among `lines` (blanked), found by their `fn` line and the closing
/// brace at the same indentation (rustfmt's layout).
pub fn functions(lines: &[&str]) -> Vec<Function> {
    let mut out = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        let Some(name) = fn_name(l) else { continue };
        let indent = l.len() - l.trim_start().len();
        let close = format!("{}}}", &l[..indent]);
        // A declaration without a body ends with `;` before any `{`.
        let mut body = false;
        for s in &lines[i..] {
            if s.contains('{') {
                body = true;
                break;
            }
            if s.trim_end().ends_with(';') {
                break;
            }
        }
        if !body {
            continue;
        }
        if l.trim_end().ends_with('}') && l.contains('{') {
            out.push(Function { name, line: i + 1, len: 1 });
            continue;
        }
        if let Some(end) = lines[i + 1..].iter().position(|s| s.trim_end() == close) {
            out.push(Function { name, line: i + 1, len: end + 2 });
        }
    }
    out
}

fn fn_name(line: &str) -> Option<String> {
    let mut rest = line.trim_start();
    for prefix in ["pub(crate) ", "pub(super) ", "pub ", "const ", "async ", "unsafe ", "extern \"C\" "] {
        rest = rest.strip_prefix(prefix).unwrap_or(rest);
    }
    let rest = rest.strip_prefix("fn ")?;
    let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
    (!name.is_empty()).then_some(name)
}

/// Whether `blanked` uses the crate imported as `ident`: `ident::…`, `use ident`, `ident!`, or
/// `extern crate ident`.
pub fn uses_crate(blanked: &str, ident: &str) -> bool {
    let mut from = 0;
    while let Some(at) = blanked[from..].find(ident) {
        let start = from + at;
        let end = start + ident.len();
        from = end;
        let before = blanked[..start].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let after = &blanked[end..];
        let prefix = blanked[..start].trim_end();
        if after.starts_with("::")
            || after.starts_with('!')
            || prefix.ends_with("use")
            || prefix.ends_with("extern crate")
            || (after.starts_with(';') && prefix.ends_with("as"))
        {
            return true;
        }
    }
    false
}

/// Each `unsafe` block, fn or impl in `text` (by line, 1-based) whose justification is missing:
/// a `// SAFETY:` comment on the same line or in the comment lines right above it (for an
/// `unsafe fn`, a `# Safety` section in its doc comment).
pub fn unjustified_unsafe(text: &str) -> Vec<usize> {
    let blanked = blank(text);
    let code: Vec<&str> = blanked.lines().collect();
    let original: Vec<&str> = text.lines().collect();
    let mut bad = Vec::new();
    for (i, l) in code.iter().enumerate() {
        let Some(at) = find_word(l, "unsafe") else { continue };
        let after = l[at + "unsafe".len()..].trim_start();
        let is_fn = after.starts_with("fn ") || after.starts_with("extern");
        let justified = |marker: &str| {
            if original[i].contains(marker) {
                return true;
            }
            // Walk up through comments, attributes and the lines of a statement the block ends.
            let mut j = i;
            while j > 0 {
                j -= 1;
                let t = original[j].trim_start();
                if t.contains(marker) {
                    return true;
                }
                if !(t.starts_with("//") || t.starts_with("#[") || t.is_empty()) {
                    return false;
                }
            }
            false
        };
        let ok = if is_fn { justified("# Safety") || justified("SAFETY:") } else { justified("SAFETY:") };
        if !ok {
            bad.push(i + 1);
        }
    }
    bad
}

fn find_word(line: &str, word: &str) -> Option<usize> {
    let mut from = 0;
    while let Some(at) = line[from..].find(word) {
        let start = from + at;
        let end = start + word.len();
        let before_ok = line[..start].chars().next_back().is_none_or(|c| !(c.is_alphanumeric() || c == '_'));
        let after_ok = line[end..].chars().next().is_none_or(|c| !(c.is_alphanumeric() || c == '_'));
        if before_ok && after_ok {
            return Some(start);
        }
        from = end;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comments_and_strings_are_blanked_and_lines_kept() {
        let src = "let a = \"unsafe { x }\"; // unsafe {\nlet b = r#\"http://x\"#; /* a\n b */ let c = 'x'; let d: &'static str = \"\";\n";
        let b = blank(src);
        assert_eq!(b.lines().count(), src.lines().count());
        assert!(!b.contains("unsafe"), "{b}");
        assert!(!b.contains("http"), "{b}");
        assert!(b.contains("let c") && b.contains("&'static"), "{b}");
    }

    #[test]
    fn functions_and_their_lengths() {
        let src = "fn a() {\n    x();\n}\n\npub(crate) fn b(\n    y: u8,\n) -> u8 {\n    y\n}\ntrait T {\n    fn decl(&self);\n    fn one(&self) { }\n}\n";
        let lines: Vec<&str> = src.lines().collect();
        let f = functions(&lines);
        assert_eq!(
            f,
            vec![
                Function { name: "a".into(), line: 1, len: 3 },
                Function { name: "b".into(), line: 5, len: 5 },
                Function { name: "one".into(), line: 12, len: 1 },
            ]
        );
    }

    #[test]
    fn test_modules_are_not_code() {
        let src = "fn a() {}\n#[cfg(test)]\nmod tests {\n    fn long() {}\n}\n";
        assert_eq!(code_lines(src), vec!["fn a() {}"]);
    }

    #[test]
    fn crate_use_is_a_path_a_use_or_a_macro() {
        assert!(uses_crate("use serde::Deserialize;", "serde"));
        assert!(uses_crate("let x = tokio::spawn(f);", "tokio"));
        assert!(uses_crate("    hex::encode(b)", "hex"));
        assert!(!uses_crate("let in_tokio = 1; let hexagon = 2;", "tokio"));
        assert!(!uses_crate("let hexagon::x = 2;", "hex"));
        assert!(!uses_crate(&blank("// tokio::spawn in a comment\n"), "tokio"));
    }

    #[test]
    fn unsafe_needs_a_safety_comment() {
        let ok = "// SAFETY: the pointer is valid.\nunsafe { f() }\nlet x = unsafe { g() }; // SAFETY: g has no preconditions.\n";
        assert!(unjustified_unsafe(ok).is_empty());
        let bad = "let y = 1;\nunsafe { f() }\n";
        assert_eq!(unjustified_unsafe(bad), vec![2]);
        let doc = "/// # Safety\n/// `p` must be valid.\npub unsafe fn h(p: *const u8) {}\n";
        assert!(unjustified_unsafe(doc).is_empty());
        assert!(unjustified_unsafe("let s = \"unsafe { }\";\n").is_empty(), "strings are not code");
    }
}
