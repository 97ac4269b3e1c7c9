//! The rows of a `qpai batch run`: JSONL (an object per line) or CSV (a
//! header line, then a row per record). A row's fields are the prompt's
//! variables (CSV cells read as each variable's type); an `id` field names
//! the row; other fields are left out. Every row is checked against the
//! prompt before anything runs, and every problem is reported with its
//! row and line.

use std::path::Path;

use serde_json::{Map, Value};

use crate::prompts::PromptTemplate;

/// The field that names a row in the output (else `row-N`).
const ID_FIELD: &str = "id";
/// Problems listed at most.
const MAX_PROBLEMS: usize = 20;

/// A row: its name, its 1-based line in the file, its variables.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub id: String,
    pub line: usize,
    pub variables: Map<String, Value>,
}

/// Reads and checks the rows of `path` (its content) for `template`.
pub fn read_rows(
    path: &Path,
    content: &[u8],
    template: &PromptTemplate,
) -> anyhow::Result<Vec<Row>> {
    let csv = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("csv"));
    let records = if csv {
        csv_records(content, Some(template))?
    } else {
        jsonl_records(content)?
    };
    let mut rows = Vec::with_capacity(records.len());
    let mut problems = Vec::new();
    let mut ids = std::collections::HashSet::new();
    for (index, (line, mut fields)) in records.into_iter().enumerate() {
        let id = match fields.remove(ID_FIELD) {
            Some(Value::String(id)) => id,
            Some(other) => other.to_string(),
            None => format!("row-{}", index + 1),
        };
        if !ids.insert(id.clone()) {
            problems.push(format!("line {line}: the id {id:?} is used twice"));
        }
        fields.retain(|name, _| template.variables.contains_key(name));
        if let Err(error) = template.render(&fields) {
            problems.push(format!("line {line} ({id}): {}", error.message));
        }
        rows.push(Row {
            id,
            line,
            variables: fields,
        });
    }
    if rows.is_empty() {
        anyhow::bail!("{} has no rows", path.display());
    }
    if !problems.is_empty() {
        let more = problems.len().saturating_sub(MAX_PROBLEMS);
        problems.truncate(MAX_PROBLEMS);
        if more > 0 {
            problems.push(format!("and {more} more"));
        }
        anyhow::bail!(
            "{} does not fit prompt {}; nothing was run:\n  {}",
            path.display(),
            template.reference(),
            problems.join("\n  ")
        );
    }
    Ok(rows)
}

/// The records of a JSONL or CSV table (by `path`'s extension), each with
/// its 1-based line; CSV cells are strings.
pub fn read_table(path: &Path, content: &[u8]) -> anyhow::Result<Vec<(usize, Map<String, Value>)>> {
    let csv = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("csv"));
    if csv {
        csv_records(content, None)
    } else {
        jsonl_records(content)
    }
}

/// JSONL: one object per non-blank line.
fn jsonl_records(content: &[u8]) -> anyhow::Result<Vec<(usize, Map<String, Value>)>> {
    let text = std::str::from_utf8(content).map_err(|e| anyhow::anyhow!("not UTF-8: {e}"))?;
    let mut records = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(line) {
            Ok(Value::Object(fields)) => records.push((index + 1, fields)),
            Ok(_) => anyhow::bail!("line {}: not a JSON object", index + 1),
            Err(e) => anyhow::bail!("line {}: not JSON: {e}", index + 1),
        }
    }
    Ok(records)
}

/// CSV with a header: each required variable of `template` must have a
/// column; cells are read as their variable's type (an empty cell of a
/// variable with a default takes the default), other cells as strings.
fn csv_records(
    content: &[u8],
    template: Option<&PromptTemplate>,
) -> anyhow::Result<Vec<(usize, Map<String, Value>)>> {
    let mut reader = csv::ReaderBuilder::new().from_reader(content);
    let header: Vec<String> = reader
        .headers()
        .map_err(|e| anyhow::anyhow!("the CSV header: {e}"))?
        .iter()
        .map(|h| h.trim().to_string())
        .collect();
    let missing: Vec<&String> = template
        .iter()
        .flat_map(|t| t.variables.iter())
        .filter(|(name, v)| v.default.is_none() && !header.contains(name))
        .map(|(name, _)| name)
        .collect();
    if !missing.is_empty() {
        anyhow::bail!(
            "the CSV has no column for {} (prompt {} needs {}); its columns are: {}",
            missing
                .iter()
                .map(|m| format!("'{m}'"))
                .collect::<Vec<_>>()
                .join(", "),
            template.map(|t| t.reference()).unwrap_or_default(),
            if missing.len() == 1 { "it" } else { "them" },
            header.join(", ")
        );
    }
    let mut records = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|e| anyhow::anyhow!("CSV: {e}"))?;
        let line = record.position().map_or(0, |p| p.line() as usize);
        let mut fields = Map::new();
        for (name, cell) in header.iter().zip(record.iter()) {
            let value = match template.and_then(|t| t.variables.get(name)) {
                Some(variable) if cell.is_empty() && variable.default.is_some() => continue,
                Some(variable) => variable.kind.from_text(cell).ok_or_else(|| {
                    anyhow::anyhow!(
                        "line {line}: column '{name}': {cell:?} is not a {}",
                        variable.kind.as_str()
                    )
                })?,
                None => Value::String(cell.to_string()),
            };
            fields.insert(name.clone(), value);
        }
        records.push((line, fields));
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prompts::Prompts;

    fn template() -> std::sync::Arc<PromptTemplate> {
        Prompts::built_in()
            .get("product_description", Some("2"))
            .unwrap()
    }

    #[test]
    fn csv_cells_take_their_variables_types() {
        let csv = "id,product,words,features,notes\n\
                   p1,Tulip bulbs,50,\"[\"\"red\"\", \"\"hardy\"\"]\",ignored\n\
                   p2,Watering can,,[],\n";
        let rows = read_rows(Path::new("rows.csv"), csv.as_bytes(), &template()).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].id, "p1");
        assert_eq!(rows[0].line, 2);
        assert_eq!(rows[0].variables["words"], 50);
        assert_eq!(
            rows[0].variables["features"],
            serde_json::json!(["red", "hardy"])
        );
        assert!(!rows[0].variables.contains_key("notes"));
        assert!(
            !rows[1].variables.contains_key("words"),
            "empty: the default"
        );
    }

    #[test]
    fn a_missing_column_or_bad_cell_is_named_before_anything_runs() {
        let error = read_rows(Path::new("r.csv"), b"id,words\na,3\n", &template())
            .unwrap_err()
            .to_string();
        assert!(error.contains("no column for 'product'"), "{error}");
        let error = read_rows(
            Path::new("r.csv"),
            b"product,words\nTulip,many\n",
            &template(),
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("line 2: column 'words'"), "{error}");
        let jsonl = b"{\"product\": \"Tulip\"}\n{\"words\": 3}\n";
        let error = read_rows(Path::new("r.jsonl"), jsonl, &template())
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("line 2 (row-2)") && error.contains("'product'"),
            "{error}"
        );
    }
}
