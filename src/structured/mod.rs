//! Structured outputs and tool calls on qpai's own models: `response_format`
//! and `tools` turned into the grammar the engine enforces (and, for tools,
//! the system-turn text that lists them), and tool-mode answers read back
//! as calls. Nothing here knows HTTP: a batch line or an eval case uses the
//! same pieces.

pub mod bench;
pub mod instance;
pub mod response_format;
pub mod schema;
pub mod tool_answer;
pub mod tools;

use serde::Serialize;
use serde_json::Value;

pub use response_format::OutputFormat;
pub use tool_answer::{PartialCall, ToolAnswer};
pub use tools::{ToolChoice, ToolSpec, ToolUse};

/// OpenAI's rule for function and schema names: `^[a-zA-Z0-9_-]{1,64}$`.
pub fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// JSON as the grammar lays it out: one space after `:` and `,`, nothing
/// else (so that what the model reads in its history is what it writes).
pub fn layout_json(value: &Value) -> String {
    struct Spaced;
    impl serde_json::ser::Formatter for Spaced {
        fn begin_array_value<W: ?Sized + std::io::Write>(
            &mut self,
            writer: &mut W,
            first: bool,
        ) -> std::io::Result<()> {
            if first {
                Ok(())
            } else {
                writer.write_all(b", ")
            }
        }
        fn begin_object_key<W: ?Sized + std::io::Write>(
            &mut self,
            writer: &mut W,
            first: bool,
        ) -> std::io::Result<()> {
            if first {
                Ok(())
            } else {
                writer.write_all(b", ")
            }
        }
        fn begin_object_value<W: ?Sized + std::io::Write>(
            &mut self,
            writer: &mut W,
        ) -> std::io::Result<()> {
            writer.write_all(b": ")
        }
    }
    let mut out = Vec::new();
    let mut serializer = serde_json::Serializer::with_formatter(&mut out, Spaced);
    match value.serialize(&mut serializer) {
        Ok(()) => String::from_utf8(out).unwrap_or_default(),
        Err(_) => value.to_string(),
    }
}

/// An earlier assistant turn that called tools, as the model would have
/// written it: `{"tool_calls": [{"name": ..., "arguments": {...}}]}`.
/// `calls` holds each call's name and its arguments' JSON text.
pub fn calls_turn(calls: &[(String, String)]) -> String {
    let calls: Vec<Value> = calls
        .iter()
        .map(|(name, arguments)| {
            let arguments = serde_json::from_str::<Value>(arguments)
                .unwrap_or_else(|_| Value::String(arguments.clone()));
            serde_json::json!({"name": name, "arguments": arguments})
        })
        .collect();
    layout_json(&serde_json::json!({"tool_calls": calls}))
}

/// A tool's result as the model reads it (a user turn: every chat
/// template has one, while few know a `tool` role).
pub fn tool_result_turn(name: &str, call_id: &str, content: &str) -> String {
    format!("Tool result of {name} (call {call_id}): {content}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_the_grammar() {
        let value = serde_json::json!({"a": [1, {"b": "x"}], "c": null});
        assert_eq!(layout_json(&value), r#"{"a": [1, {"b": "x"}], "c": null}"#);
        assert_eq!(
            calls_turn(&[("f".into(), "{\"x\":1}".into())]),
            r#"{"tool_calls": [{"name": "f", "arguments": {"x": 1}}]}"#
        );
        assert!(valid_name("get_weather-2") && !valid_name("bad name") && !valid_name(""));
    }
}
