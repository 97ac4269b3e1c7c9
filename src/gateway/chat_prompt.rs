//! A chat request as a local model reads it: the wire messages as template
//! messages (earlier tool calls and their results in the generic tool
//! format, the tool list in the system turn), and the grammar its answer
//! must match (`response_format` or the tool-call shape).

use super::validate;
use super::wire::{ChatCompletionRequest, ChatMessage, ContentPart, MessageContent, Role};
use crate::engine::constraint::GrammarSpec;
use crate::error::{ApiError, ApiResult};
use crate::models::TemplateMessage;
use crate::structured::{OutputFormat, ToolUse, calls_turn, tool_result_turn};

/// The conversation to render and what constrains the answer.
pub struct LocalPrompt {
    pub messages: Vec<TemplateMessage>,
    /// Tools the model may call in this answer (none when `tool_choice` is
    /// "none" or there are no tools).
    pub calling: Option<ToolUse>,
    pub grammar: Option<GrammarSpec>,
}

impl LocalPrompt {
    pub fn read(request: &ChatCompletionRequest) -> ApiResult<Self> {
        validate::reject_unknown_fields(&request.other, "")?;
        let format = OutputFormat::parse(request.response_format.as_ref())?;
        let tools = ToolUse::parse(
            request.tools.as_ref(),
            request.tool_choice.as_ref(),
            request.parallel_tool_calls,
        )?;
        let calling = tools.filter(ToolUse::calls_allowed);
        if calling.is_some() && format != OutputFormat::Text {
            return Err(ApiError::invalid_param(
                "response_format",
                "qpai's own models take 'response_format' or tool calls in one answer, not both: set 'tool_choice' to 'none' for a structured final answer.",
            ));
        }
        let messages = template_messages(&request.messages, calling.as_ref())?;
        let grammar = match &calling {
            Some(tools) => tools.grammar(),
            None => format.grammar(),
        };
        Ok(Self {
            messages,
            calling,
            grammar,
        })
    }

    /// The request field a grammar error is reported on.
    pub fn grammar_param(&self) -> &'static str {
        if self.calling.is_some() {
            "tools"
        } else {
            "response_format"
        }
    }
}

/// Wire messages to template messages; refuses what qpai cannot render.
fn template_messages(
    messages: &[ChatMessage],
    calling: Option<&ToolUse>,
) -> ApiResult<Vec<TemplateMessage>> {
    if messages.is_empty() {
        return Err(ApiError::invalid_param(
            "messages",
            "'messages' must contain at least one message.",
        ));
    }
    let mut out: Vec<TemplateMessage> = Vec::with_capacity(messages.len() + 1);
    // (id, function name) of every call made so far.
    let mut calls: Vec<(String, String)> = Vec::new();
    let mut after_tool_result = false;
    for (i, message) in messages.iter().enumerate() {
        validate::reject_unknown_fields(&message.other, &format!("messages[{i}]."))?;
        let text = message_text(i, message)?;
        let content_required = || {
            ApiError::invalid_param(
                format!("messages[{i}].content"),
                "A message needs 'content'.",
            )
        };
        if message.tool_calls.is_some() && message.role != Role::Assistant {
            return Err(ApiError::invalid_param(
                format!("messages[{i}].tool_calls"),
                "Only assistant messages carry 'tool_calls'.",
            ));
        }
        if message.role == Role::Tool {
            let param = format!("messages[{i}].tool_call_id");
            let id = message.tool_call_id.as_deref().ok_or_else(|| {
                ApiError::invalid_param(param.clone(), "A tool message needs 'tool_call_id'.")
            })?;
            let Some((_, name)) = calls.iter().find(|(call, _)| call == id) else {
                return Err(ApiError::invalid_param(
                    param,
                    format!(
                        "The tool_call_id '{id}' matches no call of an earlier assistant message."
                    ),
                ));
            };
            let turn = tool_result_turn(name, id, &text.ok_or_else(content_required)?);
            // Results of parallel calls share one turn.
            if after_tool_result && let Some(previous) = out.last_mut() {
                previous.content.push('\n');
                previous.content.push_str(&turn);
            } else {
                out.push(TemplateMessage {
                    role: "user".into(),
                    content: turn,
                    name: None,
                });
            }
            after_tool_result = true;
            continue;
        }
        after_tool_result = false;
        let content = match message.tool_calls.as_deref() {
            Some(made) if !made.is_empty() => {
                calls.extend(made.iter().map(|c| (c.id.clone(), c.function.name.clone())));
                let made: Vec<(String, String)> = made
                    .iter()
                    .map(|c| (c.function.name.clone(), c.function.arguments.clone()))
                    .collect();
                calls_turn(&made)
            }
            _ => text.ok_or_else(content_required)?,
        };
        out.push(TemplateMessage {
            role: message.role.template_name().to_string(),
            content,
            name: message.name.clone(),
        });
    }
    if let Some(tools) = calling {
        let listing = tools
            .system_prompt()
            .map_err(|e| ApiError::internal(format!("tool prompt: {e}")))?;
        match out.first_mut() {
            Some(system) if system.role == "system" => {
                system.content.push_str("\n\n");
                system.content.push_str(&listing);
            }
            _ => out.insert(
                0,
                TemplateMessage {
                    role: "system".into(),
                    content: listing,
                    name: None,
                },
            ),
        }
    }
    Ok(out)
}

/// A message's text (None when its content is null).
fn message_text(i: usize, message: &ChatMessage) -> ApiResult<Option<String>> {
    Ok(match &message.content {
        None => None,
        Some(MessageContent::Text(text)) => Some(text.clone()),
        Some(MessageContent::Parts(parts)) => Some(
            parts
                .iter()
                .enumerate()
                .map(|(j, part)| match part {
                    ContentPart::Text { text } => Ok(text.as_str()),
                    _ => Err(ApiError::unsupported_param(&format!(
                        "messages[{i}].content[{j}].type"
                    ))),
                })
                .collect::<ApiResult<Vec<_>>>()?
                .join("\n"),
        ),
    })
}
