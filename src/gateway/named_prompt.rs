//! A chat request that names a versioned prompt: the prompt's rendered
//! turns (system, then user) come before the request's own messages, and
//! its response_format applies when the request sets none. The answer's
//! ledger row records `NAME@VERSION`.

use serde_json::Value;

use super::Gateway;
use super::wire::{ChatCompletionRequest, ChatMessage, Role};
use crate::error::{ApiError, ApiResult};

impl Gateway {
    /// The request with its prompt applied, and the prompt's reference.
    pub(super) fn apply_prompt(
        &self,
        mut request: ChatCompletionRequest,
    ) -> ApiResult<(ChatCompletionRequest, Option<String>)> {
        let Some(named) = request.prompt.take() else {
            if request.messages.is_empty() {
                return Err(ApiError::invalid_param(
                    "messages",
                    "'messages' must hold at least one message, or the request must name a 'prompt'.",
                ));
            }
            return Ok((request, None));
        };
        let version = match &named.version {
            None | Some(Value::Null) => None,
            Some(Value::String(text)) => Some(text.clone()),
            Some(Value::Number(number)) => Some(number.to_string()),
            Some(_) => {
                return Err(ApiError::invalid_param(
                    "prompt.version",
                    "'prompt.version' must be a version number.",
                ));
            }
        };
        let template = self.prompts.get(&named.id, version.as_deref())?;
        let rendered = template.render(&named.variables).map_err(|e| {
            let param = match e.variable.as_str() {
                "" => "prompt".to_string(),
                name => format!("prompt.variables.{name}"),
            };
            ApiError::invalid_param(param, e.message)
        })?;
        let mut messages = Vec::with_capacity(request.messages.len() + 2);
        if let Some(system) = rendered.system {
            messages.push(ChatMessage::text(Role::System, system));
        }
        messages.push(ChatMessage::text(Role::User, rendered.user));
        messages.append(&mut request.messages);
        request.messages = messages;
        if request.response_format.is_none() {
            request.response_format = template.response_format.clone();
        }
        Ok((request, Some(template.reference())))
    }
}
