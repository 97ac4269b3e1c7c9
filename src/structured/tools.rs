//! Tool calls on qpai's own models: the request's `tools`, `tool_choice`
//! and `parallel_tool_calls` checked, the tool list written into the system
//! turn (the generic format of `prompts/tool_use.v1.j2`), and the grammar
//! that makes the model answer in one JSON shape, either
//! `{"content": "..."}` or `{"tool_calls": [{"name": ..., "arguments": {...}}]}`,
//! where each call names a given function and its arguments validate
//! against that function's parameters.

use minijinja::context;
use serde_json::{Value, json};

use super::{layout_json, schema, valid_name};
use crate::engine::constraint::{GrammarSpec, json_layout};
use crate::error::{ApiError, ApiResult};

/// Name (and version) of the prompt template that lists the tools.
pub const TEMPLATE_NAME: &str = "tool_use.v1";
const TEMPLATE: &str = include_str!("../../prompts/tool_use.v1.j2");

/// OpenAI's limit on tools per request.
pub const MAX_TOOLS: usize = 128;
/// Calls one answer may hold when parallel calls are allowed.
pub const MAX_PARALLEL_CALLS: usize = 8;

/// One function the model may call.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolSpec {
    pub name: String,
    pub description: Option<String>,
    /// The JSON schema of the arguments (an empty object when not given).
    pub parameters: Value,
    pub strict: bool,
}

/// `tool_choice`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    /// No calls: the model answers in text.
    None,
    /// The model chooses between calls and text.
    Auto,
    /// At least one call.
    Required,
    /// A call of this function.
    Function(String),
}

/// The tools of a request and how they may be used.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolUse {
    pub tools: Vec<ToolSpec>,
    pub choice: ToolChoice,
    pub parallel: bool,
}

impl ToolUse {
    /// Reads the request's tool fields; None without tools.
    pub fn parse(
        tools: Option<&Value>,
        tool_choice: Option<&Value>,
        parallel_tool_calls: Option<bool>,
    ) -> ApiResult<Option<Self>> {
        let tool_choice = tool_choice.filter(|v| !v.is_null());
        let Some(tools) = tools.filter(|v| !v.is_null()) else {
            if tool_choice.is_some() {
                return Err(ApiError::invalid_param(
                    "tool_choice",
                    "'tool_choice' is only allowed when 'tools' are specified.",
                ));
            }
            if parallel_tool_calls.is_some() {
                return Err(ApiError::invalid_param(
                    "parallel_tool_calls",
                    "'parallel_tool_calls' is only allowed when 'tools' are specified.",
                ));
            }
            return Ok(None);
        };
        let Some(list) = tools.as_array() else {
            return Err(ApiError::invalid_param(
                "tools",
                "'tools' must be an array of function tools.",
            ));
        };
        if list.is_empty() || list.len() > MAX_TOOLS {
            return Err(ApiError::invalid_param(
                "tools",
                format!(
                    "'tools' must hold 1 to {MAX_TOOLS} tools; got {}.",
                    list.len()
                ),
            ));
        }
        let tools = list
            .iter()
            .enumerate()
            .map(|(i, tool)| parse_tool(i, tool))
            .collect::<ApiResult<Vec<_>>>()?;
        for (i, tool) in tools.iter().enumerate() {
            if tools[..i].iter().any(|t| t.name == tool.name) {
                return Err(ApiError::invalid_param(
                    "tools",
                    format!("The function name '{}' is used by two tools.", tool.name),
                ));
            }
        }
        let choice = parse_choice(tool_choice, &tools)?;
        Ok(Some(Self {
            tools,
            choice,
            parallel: parallel_tool_calls.unwrap_or(true),
        }))
    }

    /// Whether the model may call tools in this answer.
    pub fn calls_allowed(&self) -> bool {
        self.choice != ToolChoice::None
    }

    /// The text added to the system turn: the tools and the answer format.
    /// Empty when calls are not allowed (the model answers in text).
    pub fn system_prompt(&self) -> Result<String, minijinja::Error> {
        if !self.calls_allowed() {
            return Ok(String::new());
        }
        let listed: Vec<String> = self
            .tools
            .iter()
            .map(|tool| {
                let mut entry = json!({"name": tool.name});
                if let Some(description) = &tool.description {
                    entry["description"] = Value::String(description.clone());
                }
                entry["parameters"] = tool.parameters.clone();
                layout_json(&entry)
            })
            .collect();
        let (choice, forced) = match &self.choice {
            ToolChoice::Auto => ("auto", None),
            ToolChoice::Function(name) => ("function", Some(name.as_str())),
            _ => ("required", None),
        };
        crate::prompts::render(
            TEMPLATE_NAME,
            TEMPLATE,
            context! {
                tools => listed,
                choice,
                forced,
                parallel => self.parallel,
            },
        )
    }

    /// The grammar of the answer; None when calls are not allowed.
    pub fn grammar(&self) -> Option<GrammarSpec> {
        if !self.calls_allowed() {
            return None;
        }
        let literal = |text: &str| serde_json::to_string(text).unwrap_or_default();
        let mut lark = String::new();
        let callable: Vec<(usize, &ToolSpec)> = self
            .tools
            .iter()
            .enumerate()
            .filter(|(_, t)| match &self.choice {
                ToolChoice::Function(name) => &t.name == name,
                _ => true,
            })
            .collect();
        lark.push_str(match self.choice {
            ToolChoice::Auto => "start: calls | text\n",
            _ => "start: calls\n",
        });
        let mut text_schema = json!({"type": "string"});
        text_schema["x-guidance"] = json_layout();
        lark.push_str(&format!(
            "text: {} %json {} {}\n",
            literal("{\"content\": "),
            text_schema,
            literal("}")
        ));
        let repeat = if self.parallel {
            format!(" ({} call){{0,{}}}", literal(", "), MAX_PARALLEL_CALLS - 1)
        } else {
            String::new()
        };
        lark.push_str(&format!(
            "calls: {} call{repeat} {}\n",
            literal("{\"tool_calls\": ["),
            literal("]}")
        ));
        let alternatives: Vec<String> = callable.iter().map(|(i, _)| format!("call_{i}")).collect();
        lark.push_str(&format!("call: {}\n", alternatives.join(" | ")));
        for (i, tool) in callable {
            let mut parameters = schema::bounded(&tool.parameters);
            let mut options = json_layout();
            options["lenient"] = Value::Bool(!tool.strict);
            parameters["x-guidance"] = options;
            lark.push_str(&format!(
                "call_{i}: {} %json {parameters} {}\n",
                literal(&format!("{{\"name\": \"{}\", \"arguments\": ", tool.name)),
                literal("}")
            ));
        }
        Some(GrammarSpec::Lark(lark))
    }
}

fn parse_tool(i: usize, tool: &Value) -> ApiResult<ToolSpec> {
    let at = |field: &str| format!("tools[{i}]{field}");
    if tool.get("type").and_then(Value::as_str) != Some("function") {
        return Err(ApiError::invalid_param(
            at(".type"),
            "Only tools of type 'function' are supported.",
        ));
    }
    let Some(function) = tool.get("function").and_then(Value::as_object) else {
        return Err(ApiError::invalid_param(
            at(".function"),
            "A function tool needs a 'function' object.",
        ));
    };
    let name = match function.get("name").and_then(Value::as_str) {
        Some(name) if valid_name(name) => name.to_string(),
        Some(name) => {
            return Err(ApiError::invalid_param(
                at(".function.name"),
                format!("Invalid function name '{name}': it must match ^[a-zA-Z0-9_-]{{1,64}}$."),
            ));
        }
        None => {
            return Err(ApiError::invalid_param(
                at(".function.name"),
                "Missing required parameter: the function's 'name'.",
            ));
        }
    };
    let description = match function.get("description") {
        None | Some(Value::Null) => None,
        Some(Value::String(text)) => Some(text.clone()),
        Some(_) => {
            return Err(ApiError::invalid_param(
                at(".function.description"),
                "'description' must be a string.",
            ));
        }
    };
    let strict = function
        .get("strict")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let parameters = match function.get("parameters") {
        None | Some(Value::Null) => {
            json!({"type": "object", "properties": {}, "additionalProperties": false})
        }
        Some(schema @ Value::Object(_)) => schema.clone(),
        Some(_) => {
            return Err(ApiError::invalid_param(
                at(".function.parameters"),
                "'parameters' must be a JSON Schema object.",
            ));
        }
    };
    schema::check(&parameters, strict).map_err(|problem| {
        ApiError::invalid_param(
            at(".function.parameters"),
            format!("The parameters of '{name}' cannot be enforced: {problem}."),
        )
    })?;
    Ok(ToolSpec {
        name,
        description,
        parameters,
        strict,
    })
}

fn parse_choice(value: Option<&Value>, tools: &[ToolSpec]) -> ApiResult<ToolChoice> {
    let invalid = || {
        ApiError::invalid_param(
            "tool_choice",
            "'tool_choice' must be 'none', 'auto', 'required' or {\"type\": \"function\", \"function\": {\"name\": ...}}.",
        )
    };
    match value {
        None => Ok(ToolChoice::Auto),
        Some(Value::String(choice)) => match choice.as_str() {
            "none" => Ok(ToolChoice::None),
            "auto" => Ok(ToolChoice::Auto),
            "required" => Ok(ToolChoice::Required),
            _ => Err(invalid()),
        },
        Some(Value::Object(choice)) => {
            let name = choice
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .filter(|_| choice.get("type").and_then(Value::as_str) == Some("function"))
                .ok_or_else(invalid)?;
            if !tools.iter().any(|t| t.name == name) {
                return Err(ApiError::invalid_param(
                    "tool_choice",
                    format!("'tool_choice' names the function '{name}', which is not in 'tools'."),
                ));
            }
            Ok(ToolChoice::Function(name.to_string()))
        }
        Some(_) => Err(invalid()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> Value {
        json!({"type": "function", "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                           "required": ["city"], "additionalProperties": false},
            "strict": true}})
    }

    fn param(tools: Value, choice: Option<Value>) -> Option<String> {
        ToolUse::parse(Some(&tools), choice.as_ref(), None)
            .unwrap_err()
            .param
    }

    #[test]
    fn reads_tools_and_choices() {
        let tools = json!([weather()]);
        let parsed = ToolUse::parse(Some(&tools), None, None).unwrap().unwrap();
        assert_eq!(parsed.choice, ToolChoice::Auto);
        assert!(parsed.parallel);
        let named = json!({"type": "function", "function": {"name": "get_weather"}});
        let parsed = ToolUse::parse(Some(&tools), Some(&named), Some(false))
            .unwrap()
            .unwrap();
        assert_eq!(parsed.choice, ToolChoice::Function("get_weather".into()));
        let prompt = parsed.system_prompt().unwrap();
        assert!(prompt.contains("\"name\": \"get_weather\""), "{prompt}");
        assert!(prompt.contains("Call the function get_weather"), "{prompt}");
        let none = ToolUse::parse(Some(&tools), Some(&json!("none")), None)
            .unwrap()
            .unwrap();
        assert_eq!(none.system_prompt().unwrap(), "");
        assert_eq!(none.grammar(), None);
    }

    #[test]
    fn the_grammar_lists_only_the_forced_function() {
        let second = json!({"type": "function", "function": {"name": "search"}});
        let tools = json!([weather(), second]);
        let named = json!({"type": "function", "function": {"name": "search"}});
        let parsed = ToolUse::parse(Some(&tools), Some(&named), Some(false))
            .unwrap()
            .unwrap();
        let Some(GrammarSpec::Lark(lark)) = parsed.grammar() else {
            panic!("a tool grammar is Lark");
        };
        assert!(lark.contains("call: call_1\n"), "{lark}");
        assert!(!lark.contains("get_weather"), "{lark}");
        assert!(lark.starts_with("start: calls\n"), "{lark}");
    }

    #[test]
    fn bad_tools_name_the_field() {
        let bad_name = json!([{"type": "function", "function": {"name": "bad name!"}}]);
        assert_eq!(
            param(bad_name, None).as_deref(),
            Some("tools[0].function.name")
        );
        assert_eq!(
            param(json!([weather(), weather()]), None).as_deref(),
            Some("tools")
        );
        let many: Vec<Value> = (0..129)
            .map(|i| json!({"type": "function", "function": {"name": format!("f{i}")}}))
            .collect();
        assert_eq!(param(Value::Array(many), None).as_deref(), Some("tools"));
        let unknown = json!({"type": "function", "function": {"name": "nope"}});
        assert_eq!(
            param(json!([weather()]), Some(unknown)).as_deref(),
            Some("tool_choice")
        );
        let error = ToolUse::parse(None, Some(&json!("auto")), None).unwrap_err();
        assert_eq!(error.param.as_deref(), Some("tool_choice"));
    }
}
