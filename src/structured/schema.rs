//! Checks a JSON schema before it is compiled into a grammar, so that a
//! schema qpai cannot enforce is refused with the path and keyword at fault
//! (the grammar engine's own errors name neither). Strict schemas may use
//! only the keywords the engine enforces; non-strict ones may carry others,
//! which are then ignored (documented in docs/structured-outputs.md).

use serde_json::Value;

/// How deep subschemas may nest: each object property, array item or
/// alternative is one level (OpenAI's strict mode allows 10 levels of objects).
pub const MAX_SCHEMA_DEPTH: usize = 24;

/// Keywords the grammar engine enforces.
const ENFORCED: [&str; 26] = [
    "anyOf",
    "allOf",
    "$ref",
    "const",
    "enum",
    "type",
    "items",
    "additionalItems",
    "prefixItems",
    "minItems",
    "maxItems",
    "properties",
    "additionalProperties",
    "patternProperties",
    "required",
    "minProperties",
    "maxProperties",
    "minLength",
    "maxLength",
    "pattern",
    "format",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
];

/// Keywords that say nothing about valid values.
const ANNOTATIONS: [&str; 16] = [
    "$anchor",
    "$defs",
    "definitions",
    "$schema",
    "$id",
    "id",
    "$comment",
    "title",
    "description",
    "default",
    "readOnly",
    "writeOnly",
    "examples",
    "contentMediaType",
    "contentEncoding",
    "deprecated",
];

/// String formats the grammar engine turns into patterns.
pub const FORMATS: [&str; 10] = [
    "date-time",
    "time",
    "date",
    "duration",
    "email",
    "hostname",
    "ipv4",
    "ipv6",
    "uuid",
    "uri",
];

/// Fraction digits allowed in `date-time` and `time` strings. The formats
/// allow any number; a small model can repeat digits until `max_tokens`.
pub const MAX_FRACTION_DIGITS: usize = 9;

/// The schema as the grammar enforces it: `date-time` and `time` strings
/// without a pattern of their own get one bounding their fraction of a
/// second to nanoseconds (still valid for the format, and sure to end).
/// Literal values (`const`, `enum`, `default`, `examples`) are left alone.
pub fn bounded(schema: &Value) -> Value {
    let mut schema = schema.clone();
    bound(&mut schema);
    schema
}

fn bound(value: &mut Value) {
    match value {
        Value::Object(object) => {
            let timed = matches!(
                object.get("format").and_then(Value::as_str),
                Some("date-time" | "time")
            );
            if timed && !object.contains_key("pattern") {
                object.insert(
                    "pattern".into(),
                    Value::String(format!(
                        "^[^.]*(\\.[0-9]{{1,{MAX_FRACTION_DIGITS}}}[^0-9][^.]*)?$"
                    )),
                );
            }
            for (key, child) in object.iter_mut() {
                if !matches!(key.as_str(), "const" | "enum" | "default" | "examples") {
                    bound(child);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(bound),
        _ => {}
    }
}

/// What is wrong with a schema, and where (a JSON pointer from its root).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaProblem {
    pub path: String,
    pub keyword: String,
    pub message: String,
}

impl std::fmt::Display for SchemaProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let path = if self.path.is_empty() {
            "#"
        } else {
            &self.path
        };
        write!(f, "at {path}, '{}': {}", self.keyword, self.message)
    }
}

/// Checks `schema` (its root must be an object schema or `true`).
pub fn check(schema: &Value, strict: bool) -> Result<(), SchemaProblem> {
    Walker { strict }.schema(schema, "#", 0)
}

struct Walker {
    strict: bool,
}

fn problem(path: &str, keyword: &str, message: impl Into<String>) -> SchemaProblem {
    SchemaProblem {
        path: path.to_string(),
        keyword: keyword.to_string(),
        message: message.into(),
    }
}

/// `~` and `/` escaped as a JSON pointer needs.
fn pointer_part(name: &str) -> String {
    name.replace('~', "~0").replace('/', "~1")
}

impl Walker {
    fn schema(&self, schema: &Value, path: &str, depth: usize) -> Result<(), SchemaProblem> {
        if depth > MAX_SCHEMA_DEPTH {
            return Err(problem(
                path,
                "depth",
                format!("schemas may nest at most {MAX_SCHEMA_DEPTH} levels deep"),
            ));
        }
        let object = match schema {
            Value::Bool(_) => return Ok(()),
            Value::Object(object) => object,
            _ => {
                return Err(problem(
                    path,
                    "schema",
                    "a schema must be an object or a boolean",
                ));
            }
        };
        for (keyword, value) in object {
            let here = format!("{path}/{}", pointer_part(keyword));
            match keyword.as_str() {
                "properties" | "patternProperties" | "$defs" | "definitions" => {
                    let Some(map) = value.as_object() else {
                        return Err(problem(path, keyword, "must be an object of schemas"));
                    };
                    for (name, sub) in map {
                        self.schema(sub, &format!("{here}/{}", pointer_part(name)), depth + 1)?;
                    }
                }
                "items" | "additionalItems" | "additionalProperties" => {
                    self.schema(value, &here, depth + 1)?;
                }
                "oneOf" if self.strict => {
                    return Err(problem(
                        path,
                        keyword,
                        "'oneOf' cannot be enforced exactly: use 'anyOf' (or \"strict\": false, which treats it as 'anyOf')",
                    ));
                }
                "anyOf" | "oneOf" | "allOf" | "prefixItems" => {
                    let Some(list) = value.as_array().filter(|l| !l.is_empty()) else {
                        return Err(problem(
                            path,
                            keyword,
                            "must be a non-empty array of schemas",
                        ));
                    };
                    for (i, sub) in list.iter().enumerate() {
                        self.schema(sub, &format!("{here}/{i}"), depth + 1)?;
                    }
                }
                "format" => match value.as_str() {
                    Some(format) if FORMATS.contains(&format) => {}
                    Some(_) if !self.strict => {}
                    Some(format) => {
                        return Err(problem(
                            path,
                            keyword,
                            format!(
                                "the format '{format}' is not supported (supported: {})",
                                FORMATS.join(", ")
                            ),
                        ));
                    }
                    None => return Err(problem(path, keyword, "must be a string")),
                },
                "pattern" => {
                    if !value.is_string() {
                        return Err(problem(path, keyword, "must be a string"));
                    }
                }
                "required" => {
                    if !value
                        .as_array()
                        .is_some_and(|l| l.iter().all(Value::is_string))
                    {
                        return Err(problem(path, keyword, "must be an array of strings"));
                    }
                }
                "enum" => {
                    if value.as_array().is_none_or(|l| l.is_empty()) {
                        return Err(problem(path, keyword, "must be a non-empty array"));
                    }
                }
                "$ref" => {
                    if !value.as_str().is_some_and(|r| r.starts_with('#')) {
                        return Err(problem(
                            path,
                            keyword,
                            "only references inside the schema ('#/...') are supported",
                        ));
                    }
                }
                known if ENFORCED.contains(&known) || ANNOTATIONS.contains(&known) => {}
                unknown if unknown.starts_with("x-") => {}
                _ if !self.strict => {}
                _ => {
                    return Err(problem(
                        path,
                        keyword,
                        "this keyword is not supported in a strict schema (set \"strict\": false to have it ignored)",
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn supported_schemas_pass() {
        let schema = json!({
            "type": "object",
            "properties": {
                "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
                "when": {"type": "string", "format": "date-time"},
                "node": {"$ref": "#/$defs/node"}
            },
            "required": ["tags"],
            "additionalProperties": false,
            "$defs": {"node": {"anyOf": [{"type": "null"}, {"$ref": "#/$defs/node"}]}}
        });
        assert_eq!(check(&schema, true), Ok(()));
    }

    #[test]
    fn an_unsupported_keyword_is_named_with_its_path() {
        let schema = json!({
            "type": "object",
            "properties": {"a/b": {"type": "string", "contains": {"const": 1}}}
        });
        let error = check(&schema, true).unwrap_err();
        assert_eq!(error.path, "#/properties/a~1b");
        assert_eq!(error.keyword, "contains");
        assert_eq!(check(&schema, false), Ok(()));
    }

    #[test]
    fn time_fractions_are_bounded_and_literals_kept() {
        let schema = json!({"type": "object", "properties": {
            "at": {"type": "string", "format": "date-time"},
            "own": {"type": "string", "format": "time", "pattern": "^1"},
            "format": {"const": {"format": "time"}}}});
        let bounded = bounded(&schema);
        let pattern = bounded["properties"]["at"]["pattern"].as_str().unwrap();
        let rx = regex::Regex::new(pattern).unwrap();
        assert!(rx.is_match("2026-12-03T10:00:00.123456789Z"));
        assert!(rx.is_match("2026-12-03T10:00:00Z"));
        assert!(!rx.is_match("2026-12-03T10:00:00.1234567890Z"));
        assert_eq!(bounded["properties"]["own"]["pattern"], "^1");
        assert_eq!(
            bounded["properties"]["format"],
            schema["properties"]["format"]
        );
    }

    #[test]
    fn depth_and_formats_are_bounded() {
        let mut schema = json!({"type": "string"});
        for _ in 0..40 {
            schema = json!({"type": "array", "items": schema});
        }
        assert_eq!(check(&schema, true).unwrap_err().keyword, "depth");
        let format = json!({"type": "string", "format": "credit-card"});
        assert_eq!(check(&format, true).unwrap_err().keyword, "format");
        assert_eq!(check(&format, false), Ok(()));
    }
}
