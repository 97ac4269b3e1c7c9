//! Checks a JSON value against a JSON Schema (the draft 2020-12 keywords
//! that structured outputs use: types, enum/const, objects, arrays,
//! strings, numbers, the combinators, and local `$ref`s). `format` is an
//! annotation, as the draft's default says. The first problem is reported
//! with the JSON pointer of the value that has it.

use serde_json::{Map, Value};

/// Why a value does not match: where, and what.
#[derive(Debug, Clone, PartialEq)]
pub struct Mismatch {
    /// A JSON pointer into the value ("" for the whole).
    pub at: String,
    pub message: String,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let at = if self.at.is_empty() { "/" } else { &self.at };
        write!(f, "at {at}: {}", self.message)
    }
}

/// Checks `value` against `schema`.
pub fn validate(schema: &Value, value: &Value) -> Result<(), Mismatch> {
    Checker { root: schema }.check(schema, value, "", 0)
}

/// Deeper than this, a `$ref` cycle is assumed.
const MAX_DEPTH: usize = 64;

struct Checker<'a> {
    root: &'a Value,
}

fn fail(at: &str, message: String) -> Result<(), Mismatch> {
    Err(Mismatch {
        at: at.to_string(),
        message,
    })
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(n) if n.as_f64().is_some_and(|f| f.fract() == 0.0) => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn has_type(value: &Value, name: &str) -> bool {
    let actual = type_name(value);
    actual == name || (name == "number" && actual == "integer")
}

fn pointer_part(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

impl<'a> Checker<'a> {
    fn resolve(&self, reference: &str) -> Option<&'a Value> {
        let pointer = reference.strip_prefix('#')?;
        self.root.pointer(pointer)
    }

    fn check(&self, schema: &Value, value: &Value, at: &str, depth: usize) -> Result<(), Mismatch> {
        if depth > MAX_DEPTH {
            return fail(at, "the schema nests too deep (a $ref cycle?)".into());
        }
        let schema = match schema {
            Value::Bool(true) => return Ok(()),
            Value::Bool(false) => return fail(at, "no value is allowed here".into()),
            Value::Object(schema) => schema,
            _ => return fail(at, "the schema is not an object".into()),
        };
        if let Some(reference) = schema.get("$ref").and_then(Value::as_str) {
            let Some(target) = self.resolve(reference) else {
                return fail(
                    at,
                    format!("the schema's $ref {reference:?} points nowhere"),
                );
            };
            self.check(target, value, at, depth + 1)?;
        }
        self.check_type(schema, value, at)?;
        if let Some(options) = schema.get("enum").and_then(Value::as_array)
            && !options.contains(value)
        {
            return fail(
                at,
                format!("{value} is not one of {}", Value::from(options.clone())),
            );
        }
        if let Some(expected) = schema.get("const")
            && expected != value
        {
            return fail(at, format!("{value} is not {expected}"));
        }
        self.check_combinators(schema, value, at, depth)?;
        match value {
            Value::Object(object) => self.check_object(schema, object, at, depth),
            Value::Array(items) => self.check_array(schema, items, at, depth),
            Value::String(text) => check_string(schema, text, at),
            Value::Number(number) => check_number(schema, number.as_f64().unwrap_or(0.0), at),
            _ => Ok(()),
        }
    }

    fn check_type(
        &self,
        schema: &Map<String, Value>,
        value: &Value,
        at: &str,
    ) -> Result<(), Mismatch> {
        let allowed: Vec<&str> = match schema.get("type") {
            Some(Value::String(name)) => vec![name.as_str()],
            Some(Value::Array(names)) => names.iter().filter_map(Value::as_str).collect(),
            _ => return Ok(()),
        };
        if allowed.iter().any(|name| has_type(value, name)) {
            return Ok(());
        }
        fail(
            at,
            format!(
                "expected {}, got {}",
                allowed.join(" or "),
                type_name(value)
            ),
        )
    }

    fn check_combinators(
        &self,
        schema: &Map<String, Value>,
        value: &Value,
        at: &str,
        depth: usize,
    ) -> Result<(), Mismatch> {
        if let Some(all) = schema.get("allOf").and_then(Value::as_array) {
            for part in all {
                self.check(part, value, at, depth + 1)?;
            }
        }
        if let Some(any) = schema.get("anyOf").and_then(Value::as_array)
            && !any
                .iter()
                .any(|part| self.check(part, value, at, depth + 1).is_ok())
        {
            return fail(at, "matches none of anyOf".into());
        }
        if let Some(one) = schema.get("oneOf").and_then(Value::as_array) {
            let matching = one
                .iter()
                .filter(|part| self.check(part, value, at, depth + 1).is_ok())
                .count();
            if matching != 1 {
                return fail(at, format!("matches {matching} of oneOf, not exactly 1"));
            }
        }
        if let Some(not) = schema.get("not")
            && self.check(not, value, at, depth + 1).is_ok()
        {
            return fail(at, "matches the schema under 'not'".into());
        }
        Ok(())
    }

    fn check_object(
        &self,
        schema: &Map<String, Value>,
        object: &Map<String, Value>,
        at: &str,
        depth: usize,
    ) -> Result<(), Mismatch> {
        for name in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(name) = name.as_str()
                && !object.contains_key(name)
            {
                return fail(at, format!("the required property {name:?} is missing"));
            }
        }
        let properties = schema.get("properties").and_then(Value::as_object);
        for (key, item) in object {
            let path = format!("{at}/{}", pointer_part(key));
            match properties.and_then(|p| p.get(key)) {
                Some(property) => self.check(property, item, &path, depth + 1)?,
                None => match schema.get("additionalProperties") {
                    Some(Value::Bool(false)) => {
                        return fail(at, format!("the property {key:?} is not allowed"));
                    }
                    Some(extra @ Value::Object(_)) => self.check(extra, item, &path, depth + 1)?,
                    _ => {}
                },
            }
        }
        let count = object.len() as u64;
        if let Some(min) = schema.get("minProperties").and_then(Value::as_u64)
            && count < min
        {
            return fail(at, format!("has {count} properties, fewer than {min}"));
        }
        if let Some(max) = schema.get("maxProperties").and_then(Value::as_u64)
            && count > max
        {
            return fail(at, format!("has {count} properties, more than {max}"));
        }
        Ok(())
    }

    fn check_array(
        &self,
        schema: &Map<String, Value>,
        items: &[Value],
        at: &str,
        depth: usize,
    ) -> Result<(), Mismatch> {
        let prefix = schema.get("prefixItems").and_then(Value::as_array);
        let prefix_len = prefix.map_or(0, Vec::len);
        for (index, item) in items.iter().enumerate() {
            let path = format!("{at}/{index}");
            match prefix.and_then(|p| p.get(index)) {
                Some(part) => self.check(part, item, &path, depth + 1)?,
                None if index >= prefix_len => {
                    if let Some(rest) = schema.get("items") {
                        self.check(rest, item, &path, depth + 1)?;
                    }
                }
                None => {}
            }
        }
        let count = items.len() as u64;
        if let Some(min) = schema.get("minItems").and_then(Value::as_u64)
            && count < min
        {
            return fail(at, format!("has {count} items, fewer than {min}"));
        }
        if let Some(max) = schema.get("maxItems").and_then(Value::as_u64)
            && count > max
        {
            return fail(at, format!("has {count} items, more than {max}"));
        }
        if schema.get("uniqueItems") == Some(&Value::Bool(true)) {
            for (i, item) in items.iter().enumerate() {
                if items[..i].contains(item) {
                    return fail(at, format!("item {i} repeats an earlier one"));
                }
            }
        }
        Ok(())
    }
}

fn check_string(schema: &Map<String, Value>, text: &str, at: &str) -> Result<(), Mismatch> {
    let length = text.chars().count() as u64;
    if let Some(min) = schema.get("minLength").and_then(Value::as_u64)
        && length < min
    {
        return fail(
            at,
            format!("is {length} characters long, shorter than {min}"),
        );
    }
    if let Some(max) = schema.get("maxLength").and_then(Value::as_u64)
        && length > max
    {
        return fail(
            at,
            format!("is {length} characters long, longer than {max}"),
        );
    }
    if let Some(pattern) = schema.get("pattern").and_then(Value::as_str) {
        let regex = regex::Regex::new(pattern).map_err(|e| Mismatch {
            at: at.to_string(),
            message: format!("the schema's pattern does not compile: {e}"),
        })?;
        if !regex.is_match(text) {
            return fail(at, format!("{text:?} does not match /{pattern}/"));
        }
    }
    Ok(())
}

fn check_number(schema: &Map<String, Value>, number: f64, at: &str) -> Result<(), Mismatch> {
    let bound = |key: &str| schema.get(key).and_then(Value::as_f64);
    if let Some(min) = bound("minimum")
        && number < min
    {
        return fail(at, format!("{number} is below the minimum {min}"));
    }
    if let Some(max) = bound("maximum")
        && number > max
    {
        return fail(at, format!("{number} is above the maximum {max}"));
    }
    if let Some(min) = bound("exclusiveMinimum")
        && number <= min
    {
        return fail(at, format!("{number} is not above {min}"));
    }
    if let Some(max) = bound("exclusiveMaximum")
        && number >= max
    {
        return fail(at, format!("{number} is not below {max}"));
    }
    if let Some(step) = bound("multipleOf")
        && step > 0.0
        && ((number / step) - (number / step).round()).abs() > 1e-9
    {
        return fail(at, format!("{number} is not a multiple of {step}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Value {
        json!({
            "type": "object",
            "properties": {
                "name": {"type": "string", "minLength": 1},
                "price": {"type": "number", "minimum": 0},
                "tags": {"type": "array", "items": {"$ref": "#/$defs/tag"}, "maxItems": 3},
                "kind": {"enum": ["bulb", "tool"]},
                "note": {"anyOf": [{"type": "string"}, {"type": "null"}]}
            },
            "required": ["name", "price"],
            "additionalProperties": false,
            "$defs": {"tag": {"type": "string", "pattern": "^[a-z]+$"}}
        })
    }

    #[test]
    fn a_matching_value_passes() {
        let value =
            json!({"name": "Tulip", "price": 3, "tags": ["red"], "kind": "bulb", "note": null});
        assert_eq!(validate(&schema(), &value), Ok(()));
    }

    #[test]
    fn each_problem_is_found_where_it_is() {
        let cases = [
            (json!({"price": 1}), "", "required property \"name\""),
            (
                json!({"name": "T", "price": -1}),
                "/price",
                "below the minimum",
            ),
            (
                json!({"name": "T", "price": 1, "tags": ["Red"]}),
                "/tags/0",
                "does not match",
            ),
            (
                json!({"name": "T", "price": 1, "kind": "seed"}),
                "/kind",
                "is not one of",
            ),
            (
                json!({"name": "T", "price": 1, "extra": 1}),
                "",
                "\"extra\" is not allowed",
            ),
            (
                json!({"name": 5, "price": 1}),
                "/name",
                "expected string, got integer",
            ),
            (
                json!({"name": "T", "price": 1, "note": 3}),
                "/note",
                "none of anyOf",
            ),
            (
                json!({"name": "T", "price": 1, "tags": ["a", "b", "c", "d"]}),
                "/tags",
                "more than 3",
            ),
        ];
        for (value, at, message) in cases {
            let mismatch = validate(&schema(), &value).unwrap_err();
            assert_eq!(mismatch.at, at, "{value}");
            assert!(mismatch.message.contains(message), "{value}: {mismatch}");
        }
    }

    #[test]
    fn integers_are_numbers_and_booleans_schemas_work() {
        assert!(validate(&json!({"type": "number"}), &json!(2)).is_ok());
        assert!(validate(&json!({"type": "integer"}), &json!(2.5)).is_err());
        assert!(validate(&json!(false), &json!(1)).is_err());
        assert!(
            validate(
                &json!({"oneOf": [{"type": "number"}, {"type": "integer"}]}),
                &json!(1)
            )
            .is_err()
        );
    }
}
