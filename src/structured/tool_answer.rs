//! Reading a tool-mode answer back, whole or while it streams. The grammar
//! fixes its layout (`{"content": "..."}` or
//! `{"tool_calls": [{"name": "...", "arguments": {...}}, ...]}`, with one
//! space after `:` and `,`), so a prefix of it can be read as far as it
//! goes: the text of the answer so far, or the calls with their names and
//! the raw text of their arguments so far.

const CONTENT_OPEN: &str = "{\"content\": \"";
const CALLS_OPEN: &str = "{\"tool_calls\": [";
const CALL_OPEN: &str = "{\"name\": \"";
const ARGUMENTS_OPEN: &str = "\", \"arguments\": ";
const NEXT_CALL: &str = "}, ";

/// A call as far as it has been generated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartialCall {
    /// Known once its closing quote has come.
    pub name: Option<String>,
    /// The raw JSON text of the arguments so far.
    pub arguments: String,
    /// The arguments are a whole JSON value.
    pub complete: bool,
}

/// What a (partial) answer says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolAnswer {
    /// Too little text to tell.
    Undecided,
    /// A text answer: the unescaped text so far.
    Content(String),
    /// Function calls.
    Calls(Vec<PartialCall>),
    /// Text outside the answer format (only possible without the grammar).
    Other(String),
}

impl ToolAnswer {
    pub fn read(text: &str) -> Self {
        if let Some(body) = text.strip_prefix(CONTENT_OPEN) {
            return Self::Content(unescape_prefix(body));
        }
        if let Some(rest) = text.strip_prefix(CALLS_OPEN) {
            return Self::Calls(read_calls(rest));
        }
        if CONTENT_OPEN.starts_with(text) || CALLS_OPEN.starts_with(text) {
            return Self::Undecided;
        }
        Self::Other(text.to_string())
    }
}

fn read_calls(mut rest: &str) -> Vec<PartialCall> {
    let mut calls = Vec::new();
    while let Some(after) = rest.strip_prefix(CALL_OPEN) {
        let Some(name_end) = after.find('"') else {
            calls.push(PartialCall {
                name: None,
                arguments: String::new(),
                complete: false,
            });
            break;
        };
        let name = after[..name_end].to_string();
        let Some(arguments) = after[name_end..].strip_prefix(ARGUMENTS_OPEN) else {
            calls.push(PartialCall {
                name: Some(name),
                arguments: String::new(),
                complete: false,
            });
            break;
        };
        let (length, complete) = json_value_extent(arguments);
        calls.push(PartialCall {
            name: Some(name),
            arguments: arguments[..length].to_string(),
            complete,
        });
        match arguments[length..].strip_prefix(NEXT_CALL) {
            Some(next) if complete => rest = next,
            _ => break,
        }
    }
    calls
}

/// The length of the JSON value at the start of `text` (an object or
/// array), and whether it is closed within `text`.
fn json_value_extent(text: &str) -> (usize, bool) {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for (i, c) in text.char_indices() {
        if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_string = true,
            '{' | '[' => depth += 1,
            '}' | ']' => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    return (i + 1, true);
                }
            }
            _ => {}
        }
    }
    (text.len(), false)
}

/// The unescaped text of a JSON string body up to its closing quote or as
/// far as `body` goes (an escape cut short is left out until it is whole).
fn unescape_prefix(body: &str) -> String {
    let mut out = String::with_capacity(body.len());
    let mut chars = body.chars();
    let mut pending_high: Option<u16> = None;
    while let Some(c) = chars.next() {
        match c {
            '"' => break,
            '\\' => {
                let Some(escape) = chars.next() else { break };
                let decoded = match escape {
                    'n' => '\n',
                    't' => '\t',
                    'r' => '\r',
                    'b' => '\u{8}',
                    'f' => '\u{c}',
                    'u' => {
                        let hex: String = chars.by_ref().take(4).collect();
                        let Some(unit) = (hex.len() == 4)
                            .then(|| u16::from_str_radix(&hex, 16).ok())
                            .flatten()
                        else {
                            break;
                        };
                        if (0xD800..0xDC00).contains(&unit) {
                            pending_high = Some(unit);
                            continue;
                        }
                        let scalar = match pending_high.take() {
                            Some(high) if (0xDC00..0xE000).contains(&unit) => {
                                0x10000
                                    + ((u32::from(high) - 0xD800) << 10)
                                    + (u32::from(unit) - 0xDC00)
                            }
                            _ => u32::from(unit),
                        };
                        char::from_u32(scalar).unwrap_or('\u{FFFD}')
                    }
                    other => other,
                };
                out.push(decoded);
            }
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_text_answers_as_they_grow() {
        assert_eq!(ToolAnswer::read("{\"con"), ToolAnswer::Undecided);
        assert_eq!(
            ToolAnswer::read("{\"content\": \"Hi \\\"you\\\"\\n\\u00e9\\u"),
            ToolAnswer::Content("Hi \"you\"\né".into())
        );
        assert_eq!(
            ToolAnswer::read("{\"content\": \"done \\ud83d\\ude00\"}"),
            ToolAnswer::Content("done \u{1F600}".into())
        );
    }

    #[test]
    fn reads_calls_as_they_grow() {
        let whole = "{\"tool_calls\": [{\"name\": \"a\", \"arguments\": {\"q\": \"}{\"}}, {\"name\": \"b\", \"arguments\": {\"x\": [1, 2]}}]}";
        let ToolAnswer::Calls(calls) = ToolAnswer::read(whole) else {
            panic!("calls");
        };
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].arguments, "{\"q\": \"}{\"}");
        assert!(calls[1].complete && calls[1].name.as_deref() == Some("b"));
        // Every prefix reads as a prefix of the whole.
        for end in 0..whole.len() {
            match ToolAnswer::read(&whole[..end]) {
                ToolAnswer::Undecided => {}
                ToolAnswer::Calls(partial) => {
                    for (p, w) in partial.iter().zip(&calls) {
                        assert!(w.arguments.starts_with(&p.arguments));
                        assert!(p.name.is_none() || p.name == w.name);
                    }
                }
                other => panic!("{end}: {other:?}"),
            }
        }
    }
}
