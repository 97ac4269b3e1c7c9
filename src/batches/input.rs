//! A batch's input file, checked as OpenAI checks it before anything runs:
//! JSONL, each line `{custom_id, method: "POST", url, body}`, `custom_id`s
//! unique, `url` the batch's endpoint, one model in the whole file, no
//! `stream`. Every error names its 1-based line; a file with any error
//! runs nothing. A line's body is otherwise checked when it runs, and a
//! bad one is answered in the error file without stopping the others.

use std::collections::HashSet;

use serde_json::Value;

use super::LineError;

/// Requests in one batch at most (OpenAI's limit).
pub const MAX_LINES: usize = 50_000;
/// Errors reported at most; the count of the rest is said in the last.
const MAX_ERRORS: usize = 100;
/// The longest `custom_id` kept.
const MAX_CUSTOM_ID: usize = 512;

/// A checked input line.
#[derive(Debug, Clone, PartialEq)]
pub struct InputLine {
    /// 1-based line number in the file.
    pub line: u64,
    pub custom_id: String,
    /// The request body, as JSON text.
    pub body: String,
}

/// The lines of a valid input file, and the one model they name.
#[derive(Debug)]
pub struct CheckedInput {
    pub lines: Vec<InputLine>,
    pub model: String,
}

fn error(code: &str, line: Option<u64>, param: Option<&str>, message: String) -> LineError {
    LineError {
        code: code.into(),
        line,
        message,
        param: param.map(str::to_string),
    }
}

/// Checks `content` as the input of a batch on `endpoint`.
pub fn check(content: &[u8], endpoint: &str) -> Result<CheckedInput, Vec<LineError>> {
    let text = std::str::from_utf8(content).map_err(|e| {
        let line = content[..e.valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count() as u64
            + 1;
        vec![error(
            "invalid_json_line",
            Some(line),
            None,
            format!("Line {line} is not valid UTF-8."),
        )]
    })?;
    let mut errors = Vec::new();
    let mut lines = Vec::new();
    let mut seen = HashSet::new();
    let mut model: Option<(String, u64)> = None;
    for (index, raw) in text.lines().enumerate() {
        let number = index as u64 + 1;
        if raw.trim().is_empty() {
            continue;
        }
        match check_line(raw, number, endpoint) {
            Ok((line, line_model)) => {
                if !seen.insert(line.custom_id.clone()) {
                    errors.push(error(
                        "duplicate_custom_id",
                        Some(number),
                        Some("custom_id"),
                        format!(
                            "Line {number} repeats custom_id '{}'; each line needs its own.",
                            line.custom_id
                        ),
                    ));
                }
                match &model {
                    None => model = Some((line_model, number)),
                    Some((first, first_line)) if *first != line_model => {
                        errors.push(error(
                            "mismatched_model",
                            Some(number),
                            Some("body.model"),
                            format!(
                                "Line {number} uses model '{line_model}', but line {first_line} uses '{first}'; a batch uses one model."
                            ),
                        ));
                    }
                    Some(_) => {}
                }
                lines.push(line);
            }
            Err(e) => errors.push(e),
        }
    }
    if lines.is_empty() && errors.is_empty() {
        errors.push(error(
            "empty_file",
            None,
            None,
            "The input file has no requests.".into(),
        ));
    }
    if lines.len() > MAX_LINES {
        errors.push(error(
            "too_many_requests",
            None,
            None,
            format!(
                "The input file has {} requests; a batch has at most {MAX_LINES}.",
                lines.len()
            ),
        ));
    }
    if !errors.is_empty() {
        if errors.len() > MAX_ERRORS {
            let more = errors.len() - MAX_ERRORS;
            errors.truncate(MAX_ERRORS);
            errors.push(error(
                "too_many_errors",
                None,
                None,
                format!("{more} more errors are not listed."),
            ));
        }
        return Err(errors);
    }
    let model = model.map(|(m, _)| m).unwrap_or_default();
    Ok(CheckedInput { lines, model })
}

/// One line: its request and the model it names.
fn check_line(raw: &str, number: u64, endpoint: &str) -> Result<(InputLine, String), LineError> {
    let value: Value = serde_json::from_str(raw).map_err(|e| {
        error(
            "invalid_json_line",
            Some(number),
            None,
            format!("Line {number} is not valid JSON: {e}."),
        )
    })?;
    let Value::Object(object) = value else {
        return Err(error(
            "invalid_json_line",
            Some(number),
            None,
            format!("Line {number} is not a JSON object."),
        ));
    };
    let missing = |field: &str| {
        error(
            "missing_required_parameter",
            Some(number),
            Some(field),
            format!("Line {number} has no '{field}'."),
        )
    };
    let custom_id = match object.get("custom_id") {
        None | Some(Value::Null) => return Err(missing("custom_id")),
        Some(Value::String(id)) if !id.is_empty() && id.chars().count() <= MAX_CUSTOM_ID => {
            id.clone()
        }
        Some(_) => {
            return Err(error(
                "invalid_value",
                Some(number),
                Some("custom_id"),
                format!(
                    "Line {number}: 'custom_id' must be a string of 1 to {MAX_CUSTOM_ID} characters."
                ),
            ));
        }
    };
    match object.get("method") {
        None | Some(Value::Null) => return Err(missing("method")),
        Some(Value::String(method)) if method == "POST" => {}
        Some(other) => {
            return Err(error(
                "invalid_value",
                Some(number),
                Some("method"),
                format!("Line {number}: 'method' must be \"POST\", not {other}."),
            ));
        }
    }
    match object.get("url") {
        None | Some(Value::Null) => return Err(missing("url")),
        Some(Value::String(url)) if url == endpoint => {}
        Some(other) => {
            return Err(error(
                "mismatched_endpoint",
                Some(number),
                Some("url"),
                format!("Line {number} is for {other}, but the batch runs '{endpoint}'."),
            ));
        }
    }
    let body = match object.get("body") {
        None | Some(Value::Null) => return Err(missing("body")),
        Some(Value::Object(body)) => body,
        Some(_) => {
            return Err(error(
                "invalid_value",
                Some(number),
                Some("body"),
                format!("Line {number}: 'body' must be a JSON object."),
            ));
        }
    };
    if let Some(unknown) = object
        .keys()
        .find(|k| !matches!(k.as_str(), "custom_id" | "method" | "url" | "body"))
    {
        return Err(error(
            "invalid_value",
            Some(number),
            Some(unknown),
            format!("Line {number} has an unknown field '{unknown}'."),
        ));
    }
    if body.get("stream").is_some_and(|s| s != &Value::Bool(false)) {
        return Err(error(
            "stream_not_supported",
            Some(number),
            Some("body.stream"),
            format!("Line {number} asks to stream; batch lines are answered whole."),
        ));
    }
    let model = match body.get("model") {
        Some(Value::String(model)) if !model.is_empty() => model.clone(),
        None | Some(Value::Null) => return Err(missing("body.model")),
        Some(_) => {
            return Err(error(
                "invalid_value",
                Some(number),
                Some("body.model"),
                format!("Line {number}: 'body.model' must be a model's name."),
            ));
        }
    };
    let line = InputLine {
        line: number,
        custom_id,
        body: Value::Object(body.clone()).to_string(),
    };
    Ok((line, model))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHAT: &str = "/v1/chat/completions";

    fn line(id: &str, model: &str) -> String {
        format!(
            r#"{{"custom_id": "{id}", "method": "POST", "url": "{CHAT}", "body": {{"model": "{model}", "messages": []}}}}"#
        )
    }

    fn codes(content: &str) -> Vec<(String, Option<u64>, Option<String>)> {
        check(content.as_bytes(), CHAT)
            .unwrap_err()
            .into_iter()
            .map(|e| (e.code, e.line, e.param))
            .collect()
    }

    #[test]
    fn a_good_file_gives_its_lines_and_model() {
        let content = format!("{}\n\n{}\n", line("a", "m"), line("b", "m"));
        let checked = check(content.as_bytes(), CHAT).unwrap();
        assert_eq!(checked.model, "m");
        let numbers: Vec<u64> = checked.lines.iter().map(|l| l.line).collect();
        assert_eq!(numbers, [1, 3], "blank lines are skipped but counted");
        let body: Value = serde_json::from_str(&checked.lines[1].body).unwrap();
        assert_eq!(body["model"], "m");
    }

    #[test]
    fn each_bad_line_is_named_with_its_number() {
        let content = [
            line("a", "m"),
            "not json".into(),
            r#"{"method": "POST", "url": "/v1/chat/completions", "body": {"model": "m"}}"#.into(),
            r#"{"custom_id": "c", "method": "POST", "body": {"model": "m"}}"#.into(),
            r#"{"custom_id": "d", "method": "POST", "url": "/v1/chat/completions"}"#.into(),
            line("a", "m"),
            line("f", "other"),
            r#"{"custom_id": "g", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m", "stream": true}}"#.into(),
            r#"{"custom_id": "h", "method": "POST", "url": "/v1/embeddings", "body": {"model": "m"}}"#.into(),
            r#"{"custom_id": "i", "method": "GET", "url": "/v1/chat/completions", "body": {"model": "m"}}"#.into(),
        ]
        .join("\n");
        let found = codes(&content);
        let expect = |code: &str, line: u64, param: Option<&str>| {
            (code.to_string(), Some(line), param.map(str::to_string))
        };
        assert_eq!(
            found,
            [
                expect("invalid_json_line", 2, None),
                expect("missing_required_parameter", 3, Some("custom_id")),
                expect("missing_required_parameter", 4, Some("url")),
                expect("missing_required_parameter", 5, Some("body")),
                expect("duplicate_custom_id", 6, Some("custom_id")),
                expect("mismatched_model", 7, Some("body.model")),
                expect("stream_not_supported", 8, Some("body.stream")),
                expect("mismatched_endpoint", 9, Some("url")),
                expect("invalid_value", 10, Some("method")),
            ]
        );
    }

    #[test]
    fn empty_and_non_utf8_files_are_refused() {
        assert_eq!(codes(""), [("empty_file".to_string(), None, None)]);
        assert_eq!(codes("\n \n"), [("empty_file".to_string(), None, None)]);
        let bad = [line("a", "m").as_bytes(), b"\n\xff\xfe\n"].concat();
        let errors = check(&bad, CHAT).unwrap_err();
        assert_eq!(errors[0].code, "invalid_json_line");
        assert_eq!(errors[0].line, Some(2));
    }

    #[test]
    fn many_errors_are_capped_with_a_count() {
        let content = vec!["nope"; MAX_ERRORS + 5].join("\n");
        let errors = check(content.as_bytes(), CHAT).unwrap_err();
        assert_eq!(errors.len(), MAX_ERRORS + 1);
        assert_eq!(errors.last().unwrap().code, "too_many_errors");
        assert!(errors.last().unwrap().message.starts_with("5 more"));
    }
}
