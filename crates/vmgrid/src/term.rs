//! What the CLI prints of text that users, guests or nodes wrote (job names, reasons, a job's
//! output) on a terminal: control characters are shown, never obeyed, so that no job can move the
//! cursor, retitle the window or hide a line. Output to a pipe or a file stays byte for byte.

use std::borrow::Cow;
use std::io::IsTerminal;

/// One field of a listing: every control character (C0, DEL, C1) shown as `\u{…}`-style escapes.
pub fn field(s: &str) -> Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return Cow::Borrowed(s);
    }
    Cow::Owned(s.chars().map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() }).collect())
}

/// A job's output for a terminal: lines, tabs and CRLF kept, every other control byte (ESC above
/// all, and a carriage return that would let the rest of a line overwrite its start) shown as
/// `^[`-style caret notation, and bytes that are not UTF-8 as `\xNN`.
pub fn output(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        let mut chars = chunk.valid().chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '\r' if chars.peek() == Some(&'\n') => out.push(b'\r'),
                '\n' | '\t' => out.push(c as u8),
                c if (c as u32) < 0x20 => out.extend_from_slice(&[b'^', (c as u8) + 0x40]),
                '\u{7f}' => out.extend_from_slice(b"^?"),
                c if c.is_control() => out.extend_from_slice(c.escape_unicode().to_string().as_bytes()),
                c => {
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                }
            }
        }
        for b in chunk.invalid() {
            out.extend_from_slice(format!("\\x{b:02x}").as_bytes());
        }
    }
    out
}

/// Whether stdout is a terminal (then [`output`] applies).
pub fn stdout_is_terminal() -> bool {
    std::io::stdout().is_terminal()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_are_shown_not_obeyed() {
        assert_eq!(field("plain"), "plain");
        assert_eq!(field("evil\u{1b}]0;pwned\u{7}"), "evil\\u{1b}]0;pwned\\u{7}");
        assert_eq!(output(b"ok\n\x1b[2Jgone\tx\r\n"), b"ok\n^[[2Jgone\tx\r\n");
        assert_eq!(output(b"rm -rf ~\rls"), b"rm -rf ~^Mls");
        assert_eq!(output(b"\xff\x7f"), b"\\xff^?");
        assert_eq!(output("\u{9b}31m".as_bytes()), b"\\u{9b}31m");
    }
}
