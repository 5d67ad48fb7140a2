//! A job's CEL expressions (`requirements`, `rank`): bounds checked on the text before it is
//! parsed ([`check`]), then the parse itself ([`parses`]), so that a job file with an expression
//! the pool would refuse is refused at its line, before anything is uploaded. Expressions are user
//! input evaluated by the coordinator for every node, so they must stay small and cheap: the
//! parser and the evaluator recurse once per operator (2,000 chained `+` overflow a thread's
//! stack), and nested comprehension macros multiply their lists' lengths (seven nested `exists`
//! over eleven elements are 19 million steps).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

/// An expression that is too large or costly, or does not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExprError {
    pub which: &'static str,
    pub message: String,
}

impl std::fmt::Display for ExprError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} is not a valid CEL expression: {}", self.which, self.message)
    }
}

/// Whether `src` is within the bounds and parses as CEL; an empty (or blank) one means no
/// expression and passes.
pub fn parses(which: &'static str, src: &str) -> Result<(), ExprError> {
    let src = src.trim();
    if src.is_empty() {
        return Ok(());
    }
    compiled(which, src).map(drop)
}

/// Distinct expression texts kept parsed; past this many the memo starts over.
const KEEP_PARSED: usize = 1024;

type Parsed = HashMap<String, Arc<cel::Program>>;

/// Expressions that passed [`check`] and parsed, by their text. The validator and the matchmaker
/// both need the parse, and a pool's submits repeat a few texts: parsing each on every submit
/// (four parses for a job with `requirements` and `rank`) was about a tenth of the coordinator's
/// CPU for a single job. Only a text that passed is kept, so a hit skips nothing.
fn parsed() -> MutexGuard<'static, Parsed> {
    static PARSED: OnceLock<Mutex<Parsed>> = OnceLock::new();
    PARSED.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner())
}

/// `src` (trimmed, not empty) checked against the bounds and parsed, or the parse of the same
/// text made before.
pub fn compiled(which: &'static str, src: &str) -> Result<Arc<cel::Program>, ExprError> {
    if let Some(p) = parsed().get(src) {
        return Ok(p.clone());
    }
    check(which, src)?;
    let program =
        cel::Program::compile(src).map_err(|e| ExprError { which, message: e.to_string().trim().to_string() })?;
    let program = Arc::new(program);
    let mut memo = parsed();
    if memo.len() >= KEEP_PARSED {
        memo.clear();
    }
    memo.insert(src.to_string(), program.clone());
    Ok(program)
}

/// Operators, commas, member accesses and brackets, in all.
pub const MAX_NODES: usize = 256;
/// Brackets inside brackets.
pub const MAX_DEPTH: usize = 32;
/// Comprehension macros (`all`, `exists`, `exists_one`, `map`, `filter`) in one expression; none
/// may be inside another.
pub const MAX_COMPREHENSIONS: usize = 8;

const MACROS: [&str; 5] = ["all", "exists", "exists_one", "map", "filter"];

/// Checks `src` against the bounds; `which` names it in the error (`requirements`, `rank`).
pub fn check(which: &'static str, src: &str) -> Result<(), ExprError> {
    let err = |message: String| Err(ExprError { which, message });
    let c: Vec<char> = src.chars().collect();
    let (mut nodes, mut depth, mut comprehensions) = (0usize, 0usize, 0usize);
    // The bracket depth at which each open comprehension's argument list began.
    let mut open: Vec<usize> = Vec::new();
    let mut i = 0;
    while i < c.len() {
        let ch = c[i];
        if ch == '/' && c.get(i + 1) == Some(&'/') {
            // A comment runs to the end of its line: nothing in it counts, or hides what follows.
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
            continue;
        }
        if ch == '"' || ch == '\'' {
            i = skip_string(&c, i, false);
            continue;
        }
        if ch.is_alphabetic() || ch == '_' {
            let start = i;
            while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
                i += 1;
            }
            let word: String = c[start..i].iter().collect();
            // A string's prefix: `r` (raw: a backslash is no escape), `b` (bytes), or both.
            let prefix = ["r", "b", "rb", "br"].contains(&word.to_ascii_lowercase().as_str());
            if prefix && matches!(c.get(i), Some('"' | '\'')) {
                i = skip_string(&c, i, word.to_ascii_lowercase().contains('r'));
                continue;
            }
            let after_dot = c[..start].iter().rev().find(|x| !x.is_whitespace()) == Some(&'.');
            let call = c[i..].iter().find(|x| !x.is_whitespace()) == Some(&'(');
            if after_dot && call && MACROS.contains(&word.as_str()) {
                if !open.is_empty() {
                    return err(format!(
                        "`{word}` inside another comprehension is too costly to evaluate on every node"
                    ));
                }
                comprehensions += 1;
                open.push(depth);
            }
            continue;
        }
        match ch {
            '(' | '[' | '{' => {
                depth += 1;
                nodes += 1;
                if depth > MAX_DEPTH {
                    return err(format!("brackets nest more than {MAX_DEPTH} deep"));
                }
            }
            ')' | ']' | '}' => {
                depth = depth.saturating_sub(1);
                if open.last() == Some(&depth) {
                    open.pop();
                }
            }
            c if "+-*/%!<>=&|?:.,".contains(c) => nodes += 1,
            _ => {}
        }
        i += 1;
    }
    if nodes > MAX_NODES {
        return err(format!("it has {nodes} operators and brackets; the limit is {MAX_NODES}"));
    }
    if comprehensions > MAX_COMPREHENSIONS {
        return err(format!("it has {comprehensions} comprehensions; the limit is {MAX_COMPREHENSIONS}"));
    }
    Ok(())
}

/// The index after the string literal that starts at `i` (with its escapes, unless `raw`; triple
/// quotes too), as CEL's lexer reads it.
fn skip_string(c: &[char], i: usize, raw: bool) -> usize {
    let q = c[i];
    let triple = c.get(i + 1) == Some(&q) && c.get(i + 2) == Some(&q);
    let mut j = i + if triple { 3 } else { 1 };
    while j < c.len() {
        if c[j] == '\\' && !raw {
            j += 2;
            continue;
        }
        if c[j] == q && (!triple || (c.get(j + 1) == Some(&q) && c.get(j + 2) == Some(&q))) {
            return j + if triple { 3 } else { 1 };
        }
        j += 1;
    }
    j
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_expressions_pass() {
        for ok in [
            "node.memory_mb >= 512 && \"wasm\" in node.vm_types",
            "node.labels.site == \"a\" || node.labels.site == \"b\"",
            "node.vm_types.exists(t, t == \"qemu\") && node.cpus > 2",
            "\"a(((((((((((((((((((((((((((((((((((b\" == node.name",
        ] {
            assert!(check("requirements", ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn an_expression_that_does_not_parse_is_refused_with_where() {
        let e = parses("rank", "node.f)ree_cpus").unwrap_err();
        assert!(e.to_string().starts_with("rank is not a valid CEL expression"), "{e}");
        assert!(e.message.contains("1:7"), "{e}");
        assert!(parses("rank", "  ").is_ok());
        assert!(parses("requirements", "node.cpus >= 2").is_ok());
    }

    /// Found in review: CEL's raw strings (a backslash is no escape there) and `//` comments
    /// were read as a string that never ended, hiding what followed from the bounds.
    #[test]
    fn raw_strings_and_comments_do_not_hide_an_expression_from_the_bounds() {
        let chain = vec!["1"; 1500].join("+");
        let src = format!("r\"\\\" == \"x\" || {chain} == 0 || \"x\" == \"x\"");
        assert!(check("requirements", &src).unwrap_err().message.contains("limit is 256"), "{src}");
        let l = "[1,2,3,4,5,6,7,8,9,10,11]";
        let nested = format!("{l}.exists(a, {l}.exists(b, a + b < 0))");
        let src = format!("// \"\n{nested}\n// \"");
        assert!(parses("requirements", &src).unwrap_err().message.contains("inside another comprehension"));
        assert!(parses("requirements", "r'a\\' == node.name || R\"x\" == node.name || b'y' == b'y'").is_ok());
        assert!(parses("requirements", "node.cpus > 1 // a comment with \" and (((\n").is_ok());
    }

    #[test]
    fn a_text_is_parsed_once_and_a_refused_one_is_refused_again() {
        let src = "node.memory_mb >= 12345 && \"wasm\" in node.vm_types";
        let (a, b) = (compiled("requirements", src).unwrap(), compiled("rank", src).unwrap());
        assert!(Arc::ptr_eq(&a, &b), "the second asks for the first's parse");
        for _ in 0..2 {
            assert!(compiled("rank", "node.f)ree_cpus").unwrap_err().message.contains("1:7"));
            let deep = format!("{}1{}", "(".repeat(40), ")".repeat(40));
            assert!(compiled("rank", &deep).unwrap_err().message.contains("32 deep"));
            assert!(!parsed().contains_key("node.f)ree_cpus") && !parsed().contains_key(&deep), "not kept");
        }
    }

    #[test]
    fn deep_long_and_costly_expressions_are_refused() {
        let chain = format!("{} == 0", vec!["1"; 2000].join("+"));
        assert!(check("requirements", &chain).unwrap_err().message.contains("limit is 256"));
        let deep = format!("{}1{}", "(".repeat(40), ")".repeat(40));
        assert!(check("rank", &deep).unwrap_err().message.contains("32 deep"));
        let list = "[0,1,2,3,4,5,6,7,8,9,10]";
        let nested = format!("{list}.exists(a, {list}.exists(b, a == b))");
        assert!(check("requirements", &nested).unwrap_err().message.contains("inside another comprehension"));
        let many = ["node.vm_types.exists(t, t == \"x\")"; 9].join(" || ");
        assert!(check("requirements", &many).unwrap_err().message.contains("9 comprehensions"));
    }
}
