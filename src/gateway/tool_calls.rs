//! A tool-mode answer on the wire: whole (`message.tool_calls`, null
//! content, `finish_reason: "tool_calls"`) or streamed as OpenAI's deltas
//! (each call's index, id, type and name first, then fragments of its
//! arguments as the model writes them).

use super::wire::{AssistantMessage, FunctionCall, FunctionCallDelta, ToolCall, ToolCallDelta};
use crate::engine::FinishReason;
use crate::structured::ToolAnswer;

fn new_call_id() -> String {
    format!("call_{}", &uuid::Uuid::new_v4().simple().to_string()[..24])
}

/// The whole answer's message and finish reason.
pub fn answer_message(
    text: String,
    finish_reason: Option<FinishReason>,
) -> (AssistantMessage, Option<FinishReason>) {
    let message = |content: Option<String>, tool_calls: Option<Vec<ToolCall>>| AssistantMessage {
        role: "assistant",
        content,
        refusal: None,
        tool_calls,
    };
    match ToolAnswer::read(&text) {
        ToolAnswer::Calls(calls) if calls.iter().any(|c| c.name.is_some()) => {
            let calls = calls
                .into_iter()
                .filter_map(|call| {
                    Some(ToolCall {
                        id: new_call_id(),
                        kind: "function".into(),
                        function: FunctionCall {
                            name: call.name?,
                            arguments: call.arguments,
                        },
                    })
                })
                .collect();
            (message(None, Some(calls)), calls_finish(finish_reason))
        }
        ToolAnswer::Content(content) => (message(Some(content), None), finish_reason),
        _ => (message(Some(text), None), finish_reason),
    }
}

/// A complete answer of calls ends with "tool_calls"; one cut by its
/// length keeps "length".
fn calls_finish(finish_reason: Option<FinishReason>) -> Option<FinishReason> {
    match finish_reason {
        Some(FinishReason::Stop) => Some(FinishReason::ToolCalls),
        other => other,
    }
}

/// What a token adds to a streamed tool-mode answer.
#[derive(Debug, Default)]
pub struct StreamDelta {
    pub content: Option<String>,
    pub tool_calls: Vec<ToolCallDelta>,
}

/// One choice's streamed tool-mode answer: what has been generated, and
/// what of it was sent.
#[derive(Debug, Default)]
pub struct ToolStream {
    text: String,
    content_sent: usize,
    calls_sent: Vec<(String, usize)>,
}

impl ToolStream {
    pub fn push(&mut self, delta: &str) -> StreamDelta {
        self.text.push_str(delta);
        let mut out = StreamDelta::default();
        match ToolAnswer::read(&self.text) {
            ToolAnswer::Undecided => {}
            ToolAnswer::Content(content) | ToolAnswer::Other(content) => {
                if content.len() > self.content_sent {
                    out.content = Some(content[self.content_sent..].to_string());
                    self.content_sent = content.len();
                }
            }
            ToolAnswer::Calls(calls) => {
                for (index, call) in calls.into_iter().enumerate() {
                    let Some(name) = call.name else { break };
                    if index == self.calls_sent.len() {
                        let id = new_call_id();
                        out.tool_calls.push(ToolCallDelta {
                            index,
                            id: Some(id.clone()),
                            kind: Some("function"),
                            function: FunctionCallDelta {
                                name: Some(name),
                                arguments: String::new(),
                            },
                        });
                        self.calls_sent.push((id, 0));
                    }
                    let sent = &mut self.calls_sent[index].1;
                    if call.arguments.len() > *sent {
                        out.tool_calls.push(ToolCallDelta {
                            index,
                            id: None,
                            kind: None,
                            function: FunctionCallDelta {
                                name: None,
                                arguments: call.arguments[*sent..].to_string(),
                            },
                        });
                        *sent = call.arguments.len();
                    }
                }
            }
        }
        out
    }

    /// The finish reason the client sees for this choice.
    pub fn finish_reason(&self, finish_reason: FinishReason) -> FinishReason {
        if self.calls_sent.is_empty() {
            finish_reason
        } else {
            calls_finish(Some(finish_reason)).unwrap_or(finish_reason)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CALLS: &str = r#"{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "f", "arguments": {}}]}"#;

    #[test]
    fn a_whole_answer_of_calls() {
        let (message, finish) = answer_message(CALLS.into(), Some(FinishReason::Stop));
        assert_eq!(finish, Some(FinishReason::ToolCalls));
        assert_eq!(message.content, None);
        let calls = message.tool_calls.unwrap();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].function.arguments, r#"{"city": "Paris"}"#);
        assert!(calls[0].id.starts_with("call_") && calls[0].id != calls[1].id);
        let (text, finish) = answer_message(
            r#"{"content": "It is \"sunny\"."}"#.into(),
            Some(FinishReason::Stop),
        );
        assert_eq!(text.content.as_deref(), Some("It is \"sunny\"."));
        assert_eq!(finish, Some(FinishReason::Stop));
    }

    #[test]
    fn streamed_deltas_add_up_to_the_whole_answer() {
        let mut stream = ToolStream::default();
        let mut names = Vec::new();
        let mut arguments = vec![String::new(), String::new()];
        for piece in CALLS.as_bytes().chunks(3) {
            let delta = stream.push(std::str::from_utf8(piece).unwrap());
            assert_eq!(delta.content, None);
            for call in delta.tool_calls {
                if let Some(name) = call.function.name {
                    assert!(call.id.is_some() && call.kind == Some("function"));
                    names.push(name);
                }
                arguments[call.index].push_str(&call.function.arguments);
            }
        }
        assert_eq!(names, ["get_weather", "f"]);
        assert_eq!(arguments, [r#"{"city": "Paris"}"#, "{}"]);
        assert_eq!(
            stream.finish_reason(FinishReason::Stop),
            FinishReason::ToolCalls
        );
    }
}
