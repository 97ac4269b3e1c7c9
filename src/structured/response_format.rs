//! `response_format`: plain text, any JSON object, or JSON matching a
//! schema, read from the request and turned into the grammar the engine
//! enforces.

use serde_json::{Value, json};

use super::{schema, valid_name};
use crate::engine::constraint::GrammarSpec;
use crate::error::{ApiError, ApiResult};

/// What the answer must be.
#[derive(Debug, Clone, PartialEq)]
pub enum OutputFormat {
    Text,
    JsonObject,
    JsonSchema {
        name: String,
        schema: Value,
        strict: bool,
    },
}

impl OutputFormat {
    /// Reads `response_format` (absent or null: text).
    pub fn parse(value: Option<&Value>) -> ApiResult<Self> {
        let Some(value) = value.filter(|v| !v.is_null()) else {
            return Ok(Self::Text);
        };
        let Some(object) = value.as_object() else {
            return Err(ApiError::invalid_param(
                "response_format",
                "'response_format' must be an object such as {\"type\": \"json_object\"}.",
            ));
        };
        let kind = object.get("type").and_then(Value::as_str).ok_or_else(|| {
            ApiError::invalid_param(
                "response_format.type",
                "'response_format.type' is required: 'text', 'json_object' or 'json_schema'.",
            )
        })?;
        match kind {
            "text" => Ok(Self::Text),
            "json_object" => Ok(Self::JsonObject),
            "json_schema" => Self::parse_json_schema(object.get("json_schema")),
            other => Err(ApiError::invalid_param(
                "response_format.type",
                format!(
                    "Invalid value: '{other}'. Supported values are: 'text', 'json_object' and 'json_schema'."
                ),
            )),
        }
    }

    fn parse_json_schema(value: Option<&Value>) -> ApiResult<Self> {
        const PARAM: &str = "response_format.json_schema";
        let Some(object) = value.and_then(Value::as_object) else {
            return Err(ApiError::invalid_param(
                PARAM,
                "'response_format.json_schema' is required with type 'json_schema': {\"name\": ..., \"schema\": {...}}.",
            ));
        };
        let name = match object.get("name") {
            Some(Value::String(name)) if valid_name(name) => name.clone(),
            Some(_) => {
                return Err(ApiError::invalid_param(
                    "response_format.json_schema.name",
                    "'response_format.json_schema.name' must match ^[a-zA-Z0-9_-]{1,64}$.",
                ));
            }
            None => {
                return Err(ApiError::invalid_param(
                    "response_format.json_schema.name",
                    "Missing required parameter: 'response_format.json_schema.name'.",
                ));
            }
        };
        let strict = match object.get("strict") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(strict)) => *strict,
            Some(_) => {
                return Err(ApiError::invalid_param(
                    "response_format.json_schema.strict",
                    "'response_format.json_schema.strict' must be a boolean.",
                ));
            }
        };
        let schema = match object.get("schema") {
            None | Some(Value::Null) => json!({"type": "object"}),
            Some(schema @ Value::Object(_)) => schema.clone(),
            Some(_) => {
                return Err(ApiError::invalid_param(
                    "response_format.json_schema.schema",
                    "'response_format.json_schema.schema' must be a JSON Schema object.",
                ));
            }
        };
        schema::check(&schema, strict).map_err(|problem| {
            ApiError::invalid_param(
                "response_format",
                format!("The schema '{name}' cannot be enforced: {problem}."),
            )
        })?;
        Ok(Self::JsonSchema {
            name,
            schema,
            strict,
        })
    }

    /// The grammar that enforces this format; None for text.
    pub fn grammar(&self) -> Option<GrammarSpec> {
        match self {
            Self::Text => None,
            Self::JsonObject => Some(GrammarSpec::JsonSchema {
                schema: json!({"type": "object"}),
                lenient: false,
            }),
            Self::JsonSchema { schema, strict, .. } => Some(GrammarSpec::JsonSchema {
                schema: schema::bounded(schema),
                lenient: !strict,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn param(value: Value) -> Option<String> {
        OutputFormat::parse(Some(&value)).unwrap_err().param
    }

    #[test]
    fn reads_the_three_kinds() {
        assert_eq!(OutputFormat::parse(None).unwrap(), OutputFormat::Text);
        assert_eq!(
            OutputFormat::parse(Some(&json!({"type": "json_object"}))).unwrap(),
            OutputFormat::JsonObject
        );
        let format = OutputFormat::parse(Some(&json!({"type": "json_schema", "json_schema": {
            "name": "faq", "strict": true, "schema": {"type": "object"}}})))
        .unwrap();
        assert!(matches!(
            format,
            OutputFormat::JsonSchema { strict: true, .. }
        ));
        assert!(matches!(
            format.grammar(),
            Some(GrammarSpec::JsonSchema { lenient: false, .. })
        ));
    }

    #[test]
    fn bad_formats_name_the_field() {
        assert_eq!(param(json!("json")).as_deref(), Some("response_format"));
        assert_eq!(
            param(json!({"type": "xml"})).as_deref(),
            Some("response_format.type")
        );
        assert_eq!(
            param(json!({"type": "json_schema", "json_schema": {"schema": {}}})).as_deref(),
            Some("response_format.json_schema.name")
        );
        assert_eq!(
            param(json!({"type": "json_schema", "json_schema": {"name": "a", "schema": 5}}))
                .as_deref(),
            Some("response_format.json_schema.schema")
        );
        let error = OutputFormat::parse(Some(&json!({"type": "json_schema", "json_schema": {
            "name": "a", "strict": true,
            "schema": {"type": "object", "properties": {"x": {"not": {}}}}}})))
        .unwrap_err();
        assert_eq!(error.param.as_deref(), Some("response_format"));
        assert!(error.message.contains("#/properties/x") && error.message.contains("'not'"));
    }
}
