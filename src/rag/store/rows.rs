//! Arrow <-> rows: the table's schema, the chunk rows written to it, and the
//! rows and search hits read back.

use std::collections::HashMap;
use std::sync::Arc;

use arrow_array::types::Float32Type;
use arrow_array::{Array, FixedSizeListArray, Float32Array, Int32Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema, SchemaRef};

use super::{ChunkRow, SearchHit};
use crate::rag::{RagError, RagResult};

const MODEL_KEY: &str = "qpai.embedding_model";
const VERSION_KEY: &str = "qpai.schema_version";
const SCHEMA_VERSION: &str = "1";

/// Columns returned by searches, with the score column of each kind.
pub const VECTOR_COLUMNS: &[&str] = &[
    "chunk_id",
    "url",
    "title",
    "heading",
    "text",
    "lang",
    "updated",
    "_distance",
];
pub const FULLTEXT_COLUMNS: &[&str] = &[
    "chunk_id", "url", "title", "heading", "text", "lang", "updated", "_score",
];

/// The table of a site embedded with `model`.
pub fn schema(dimensions: usize, model: &str) -> SchemaRef {
    let text = |name: &str, nullable: bool| Field::new(name, DataType::Utf8, nullable);
    let fields = vec![
        text("chunk_id", false),
        text("url", false),
        text("title", false),
        text("heading", false),
        text("text", false),
        text("lang", true),
        text("updated", true),
        text("source", false),
        text("origin", false),
        text("page_hash", false),
        Field::new("chunk_index", DataType::Int32, false),
        Field::new("chunk_count", DataType::Int32, false),
        Field::new(
            "vector",
            DataType::FixedSizeList(
                Arc::new(Field::new("item", DataType::Float32, true)),
                dimensions as i32,
            ),
            false,
        ),
    ];
    let metadata = HashMap::from([
        (MODEL_KEY.to_string(), model.to_string()),
        (VERSION_KEY.to_string(), SCHEMA_VERSION.to_string()),
    ]);
    Arc::new(Schema::new_with_metadata(fields, metadata))
}

/// The rows of a batch read back from the table.
pub fn chunk_rows(batch: &RecordBatch) -> RagResult<Vec<ChunkRow>> {
    let mut rows = Vec::with_capacity(batch.num_rows());
    let column = |name| strings(batch, name);
    let (ids, urls, titles, headings, texts, langs, updated, sources, origins, hashes) = (
        column("chunk_id")?,
        column("url")?,
        column("title")?,
        column("heading")?,
        column("text")?,
        column("lang")?,
        column("updated")?,
        column("source")?,
        column("origin")?,
        column("page_hash")?,
    );
    let int = |name| {
        batch
            .column_by_name(name)
            .and_then(|c| c.as_any().downcast_ref::<Int32Array>())
            .ok_or_else(|| anyhow::anyhow!("column {name} missing"))
    };
    let (index, count) = (int("chunk_index")?, int("chunk_count")?);
    let vectors = batch
        .column_by_name("vector")
        .and_then(|c| c.as_any().downcast_ref::<FixedSizeListArray>())
        .ok_or_else(|| anyhow::anyhow!("column vector missing"))?;
    let optional = |a: &StringArray, i| (!a.is_null(i)).then(|| a.value(i).to_string());
    for i in 0..batch.num_rows() {
        let vector = vectors.value(i);
        let vector = vector
            .as_any()
            .downcast_ref::<Float32Array>()
            .ok_or_else(|| anyhow::anyhow!("vector is not f32"))?;
        rows.push(ChunkRow {
            chunk_id: ids.value(i).to_string(),
            url: urls.value(i).to_string(),
            title: titles.value(i).to_string(),
            heading: headings.value(i).to_string(),
            text: texts.value(i).to_string(),
            lang: optional(langs, i),
            updated: optional(updated, i),
            source: sources.value(i).to_string(),
            origin: origins.value(i).to_string(),
            page_hash: hashes.value(i).to_string(),
            chunk_index: index.value(i),
            chunk_count: count.value(i),
            vector: vector.values().to_vec(),
        });
    }
    Ok(rows)
}

pub fn embedding_model(schema: &Schema) -> String {
    schema
        .metadata()
        .get(MODEL_KEY)
        .cloned()
        .unwrap_or_default()
}

pub fn strings<'a>(batch: &'a RecordBatch, name: &str) -> RagResult<&'a StringArray> {
    batch
        .column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<StringArray>())
        .ok_or_else(|| RagError::Other(anyhow::anyhow!("column {name} missing")))
}

pub fn hits(
    batches: &[RecordBatch],
    score_column: &str,
    score: impl Fn(f32) -> f32,
) -> RagResult<Vec<SearchHit>> {
    let mut out = Vec::new();
    for batch in batches {
        let column = |name| strings(batch, name);
        let (ids, urls, titles, headings, texts, langs, updated) = (
            column("chunk_id")?,
            column("url")?,
            column("title")?,
            column("heading")?,
            column("text")?,
            column("lang")?,
            column("updated")?,
        );
        let scores = batch
            .column_by_name(score_column)
            .and_then(|c| c.as_any().downcast_ref::<Float32Array>())
            .ok_or_else(|| anyhow::anyhow!("{score_column} missing from the results"))?;
        let optional = |a: &StringArray, i| (!a.is_null(i)).then(|| a.value(i).to_string());
        for i in 0..batch.num_rows() {
            out.push(SearchHit {
                chunk_id: ids.value(i).to_string(),
                url: urls.value(i).to_string(),
                title: titles.value(i).to_string(),
                heading: headings.value(i).to_string(),
                text: texts.value(i).to_string(),
                lang: optional(langs, i),
                updated: optional(updated, i),
                score: score(scores.value(i)),
            });
        }
    }
    Ok(out)
}

pub fn record_batch(schema: &SchemaRef, rows: Vec<ChunkRow>) -> RagResult<RecordBatch> {
    let dimensions = match schema
        .field_with_name("vector")
        .map(|f| f.data_type().clone())
    {
        Ok(DataType::FixedSizeList(_, n)) => n,
        _ => return Err(anyhow::anyhow!("the table has no vector column").into()),
    };
    if let Some(row) = rows.iter().find(|r| r.vector.len() != dimensions as usize) {
        return Err(anyhow::anyhow!(
            "a {}-dimensional vector for a table of {dimensions} dimensions",
            row.vector.len()
        )
        .into());
    }
    let text =
        |f: fn(&ChunkRow) -> &str| Arc::new(StringArray::from_iter_values(rows.iter().map(f)));
    let optional =
        |f: fn(&ChunkRow) -> Option<&str>| Arc::new(StringArray::from_iter(rows.iter().map(f)));
    let columns: Vec<Arc<dyn Array>> = vec![
        text(|r| &r.chunk_id),
        text(|r| &r.url),
        text(|r| &r.title),
        text(|r| &r.heading),
        text(|r| &r.text),
        optional(|r| r.lang.as_deref()),
        optional(|r| r.updated.as_deref()),
        text(|r| &r.source),
        text(|r| &r.origin),
        text(|r| &r.page_hash),
        Arc::new(Int32Array::from_iter_values(
            rows.iter().map(|r| r.chunk_index),
        )),
        Arc::new(Int32Array::from_iter_values(
            rows.iter().map(|r| r.chunk_count),
        )),
        Arc::new(
            FixedSizeListArray::from_iter_primitive::<Float32Type, _, _>(
                rows.iter()
                    .map(|r| Some(r.vector.iter().copied().map(Some))),
                dimensions,
            ),
        ),
    ];
    RecordBatch::try_new(schema.clone(), columns)
        .map_err(|e| RagError::Other(anyhow::anyhow!("building the rows: {e}")))
}
