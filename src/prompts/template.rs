//! A versioned prompt: TOML front matter between `+++` lines (name,
//! version, description, typed variables with defaults, the suggested
//! model and response_format, an optional system turn), then the user
//! turn, a minijinja template. Rendering checks the variables first: a
//! missing, unknown or mistyped one is an error that names it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The line that opens and closes the front matter.
const FENCE: &str = "+++";

/// A variable's JSON type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VariableType {
    String,
    Integer,
    Number,
    Boolean,
    Array,
    Object,
}

impl VariableType {
    pub fn as_str(self) -> &'static str {
        match self {
            VariableType::String => "string",
            VariableType::Integer => "integer",
            VariableType::Number => "number",
            VariableType::Boolean => "boolean",
            VariableType::Array => "array",
            VariableType::Object => "object",
        }
    }

    pub fn admits(self, value: &Value) -> bool {
        match self {
            VariableType::String => value.is_string(),
            VariableType::Integer => value.is_i64() || value.is_u64(),
            VariableType::Number => value.is_number(),
            VariableType::Boolean => value.is_boolean(),
            VariableType::Array => value.is_array(),
            VariableType::Object => value.is_object(),
        }
    }

    /// A value read from text (a CSV cell) as this type.
    pub fn from_text(self, text: &str) -> Option<Value> {
        match self {
            VariableType::String => Some(Value::String(text.to_string())),
            _ => serde_json::from_str(text.trim())
                .ok()
                .filter(|v| self.admits(v)),
        }
    }
}

/// A variable of a prompt; required unless it has a default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Variable {
    #[serde(rename = "type")]
    pub kind: VariableType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FrontMatter {
    name: String,
    version: u32,
    description: String,
    #[serde(default)]
    variables: BTreeMap<String, Variable>,
    model: Option<String>,
    response_format: Option<Value>,
    system: Option<String>,
}

/// A parsed prompt template.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PromptTemplate {
    pub name: String,
    pub version: u32,
    pub description: String,
    pub variables: BTreeMap<String, Variable>,
    /// The model it was written for (a suggestion).
    pub model: Option<String>,
    /// The response_format a request gets when it sets none.
    pub response_format: Option<Value>,
    /// The system turn's template, if any.
    pub system: Option<String>,
    /// The user turn's template.
    pub template: String,
    /// The whole file, as written.
    #[serde(skip)]
    pub source: String,
}

/// A prompt's turns, rendered.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    pub system: Option<String>,
    pub user: String,
}

/// Why variables do not fit a prompt: the parameter and the reason.
#[derive(Debug, Clone, PartialEq)]
pub struct VariableError {
    pub variable: String,
    pub message: String,
}

/// The text after a template's front matter (all of it when it has none).
pub fn body(text: &str) -> &str {
    split(text).map_or(text, |(_, body)| body)
}

fn split(text: &str) -> Option<(&str, &str)> {
    let rest = text.strip_prefix(FENCE)?.strip_prefix('\n')?;
    let end = rest.find(&format!("\n{FENCE}\n"))?;
    Some((&rest[..end], &rest[end + FENCE.len() + 2..]))
}

impl PromptTemplate {
    /// Parses a template file's text.
    pub fn parse(text: &str) -> Result<PromptTemplate, String> {
        let (front, body) = split(text)
            .ok_or_else(|| format!("no front matter: the file must start with a {FENCE} line"))?;
        let front: FrontMatter = toml::from_str(front).map_err(|e| e.to_string())?;
        crate::lora::check_name(&front.name).map_err(|e| format!("name: {e}"))?;
        for (name, variable) in &front.variables {
            if let Some(default) = &variable.default
                && !variable.kind.admits(default)
            {
                return Err(format!(
                    "variable {name}: its default is not a {}",
                    variable.kind.as_str()
                ));
            }
        }
        let template = PromptTemplate {
            name: front.name,
            version: front.version,
            description: front.description,
            variables: front.variables,
            model: front.model,
            response_format: front.response_format,
            system: front.system,
            template: body.to_string(),
            source: text.to_string(),
        };
        // Syntax errors surface when the template is read, not when used.
        let empty = Map::new();
        let sample = template.sample_variables(&empty);
        template
            .render_checked(&sample)
            .map_err(|e| format!("the template does not render: {e}"))?;
        Ok(template)
    }

    /// `name@version`, as the ledger records it.
    pub fn reference(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }

    /// The variables with defaults filled in, or the first that is
    /// missing, unknown or of the wrong type.
    pub fn variables_for(
        &self,
        given: &Map<String, Value>,
    ) -> Result<Map<String, Value>, VariableError> {
        if let Some(unknown) = given.keys().find(|k| !self.variables.contains_key(*k)) {
            return Err(VariableError {
                variable: unknown.clone(),
                message: format!(
                    "Prompt {} has no variable '{unknown}' (it has: {}).",
                    self.reference(),
                    self.variables
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            });
        }
        let mut values = Map::new();
        for (name, variable) in &self.variables {
            let value = match (given.get(name), &variable.default) {
                (Some(value), _) => value.clone(),
                (None, Some(default)) => default.clone(),
                (None, None) => {
                    return Err(VariableError {
                        variable: name.clone(),
                        message: format!(
                            "Prompt {} needs the variable '{name}' ({}).",
                            self.reference(),
                            variable.kind.as_str()
                        ),
                    });
                }
            };
            if !variable.kind.admits(&value) {
                return Err(VariableError {
                    variable: name.clone(),
                    message: format!(
                        "Variable '{name}' of prompt {} must be a {}.",
                        self.reference(),
                        variable.kind.as_str()
                    ),
                });
            }
            values.insert(name.clone(), value);
        }
        Ok(values)
    }

    /// Renders the prompt's turns with `given` variables.
    pub fn render(&self, given: &Map<String, Value>) -> Result<Rendered, VariableError> {
        let values = self.variables_for(given)?;
        self.render_checked(&values).map_err(|e| VariableError {
            variable: String::new(),
            message: format!("Prompt {} failed to render: {e}", self.reference()),
        })
    }

    fn render_checked(&self, values: &Map<String, Value>) -> Result<Rendered, minijinja::Error> {
        let context = minijinja::Value::from(minijinja::value::Serde(values));
        let system = match &self.system {
            Some(system) => Some(super::render(
                &format!("{}.system", self.reference()),
                system,
                context.clone(),
            )?),
            None => None,
        };
        let user = super::render(&self.reference(), &self.template, context)?;
        Ok(Rendered {
            system,
            user: user.trim_end().to_string(),
        })
    }

    /// Placeholder values of each variable's type (to check the syntax).
    fn sample_variables(&self, given: &Map<String, Value>) -> Map<String, Value> {
        self.variables
            .iter()
            .map(|(name, variable)| {
                let value = given.get(name).cloned().unwrap_or_else(|| {
                    variable.default.clone().unwrap_or(match variable.kind {
                        VariableType::String => Value::String(String::new()),
                        VariableType::Integer | VariableType::Number => Value::from(0),
                        VariableType::Boolean => Value::Bool(false),
                        VariableType::Array => Value::Array(Vec::new()),
                        VariableType::Object => Value::Object(Map::new()),
                    })
                });
                (name.clone(), value)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const TEXT: &str = "+++\nname = \"greet\"\nversion = 2\ndescription = \"A greeting.\"\n\
        system = \"You greet {{ who }}.\"\n\
        [variables.who]\ntype = \"string\"\n\
        [variables.times]\ntype = \"integer\"\ndefault = 1\n\
        [response_format]\ntype = \"json_object\"\n+++\n\
        Say hello to {{ who }} {{ times }} times.\n";

    fn given(value: Value) -> Map<String, Value> {
        value.as_object().unwrap().clone()
    }

    #[test]
    fn front_matter_and_turns() {
        let prompt = PromptTemplate::parse(TEXT).unwrap();
        assert_eq!(prompt.reference(), "greet@2");
        assert_eq!(prompt.response_format, Some(json!({"type": "json_object"})));
        let rendered = prompt.render(&given(json!({"who": "Ada"}))).unwrap();
        assert_eq!(rendered.system.as_deref(), Some("You greet Ada."));
        assert_eq!(rendered.user, "Say hello to Ada 1 times.");
        assert_eq!(body(TEXT), "Say hello to {{ who }} {{ times }} times.\n");
        assert_eq!(body("no front matter"), "no front matter");
    }

    #[test]
    fn variables_are_checked_by_name() {
        let prompt = PromptTemplate::parse(TEXT).unwrap();
        let error = |v: Value| prompt.render(&given(v)).unwrap_err().variable;
        assert_eq!(error(json!({})), "who");
        assert_eq!(error(json!({"who": "Ada", "tmies": 2})), "tmies");
        assert_eq!(error(json!({"who": 3})), "who");
        assert_eq!(error(json!({"who": "Ada", "times": "two"})), "times");
        assert_eq!(VariableType::Integer.from_text(" 7 "), Some(json!(7)));
        assert_eq!(VariableType::Integer.from_text("seven"), None);
    }

    #[test]
    fn broken_templates_are_refused_when_read() {
        assert!(PromptTemplate::parse("no fence").is_err());
        let bad_syntax = TEXT.replace("{{ times }} times", "{% if %}");
        assert!(
            PromptTemplate::parse(&bad_syntax)
                .unwrap_err()
                .contains("render")
        );
        let bad_default = TEXT.replace("default = 1", "default = \"one\"");
        assert!(
            PromptTemplate::parse(&bad_default)
                .unwrap_err()
                .contains("default")
        );
    }
}
