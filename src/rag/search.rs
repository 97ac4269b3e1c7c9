//! Search over a site: vector (cosine), full text (BM25), or hybrid, which
//! fuses the two rankings by reciprocal rank fusion.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

pub use super::store::SearchHit;
use super::store::quote;
use super::{Rag, RagError, RagResult, SiteName};

pub const MAX_TOP_K: usize = 100;
/// RRF's constant: a hit at rank r scores 1 / (RRF_K + r).
const RRF_K: f32 = 60.0;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SearchMode {
    Vector,
    Fulltext,
    #[default]
    Hybrid,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchFilter {
    /// Only pages whose URL starts with this.
    pub url_prefix: Option<String>,
    /// Only pages in this language (as the page declares it, lower case).
    pub lang: Option<String>,
}

impl SearchFilter {
    /// The filter as a SQL predicate.
    fn predicate(&self) -> Option<String> {
        let mut terms = Vec::new();
        if let Some(prefix) = self.url_prefix.as_deref().filter(|p| !p.is_empty()) {
            terms.push(format!("starts_with(url, {})", quote(prefix)));
        }
        if let Some(lang) = self.lang.as_deref().filter(|l| !l.is_empty()) {
            terms.push(format!("lang = {}", quote(&lang.to_ascii_lowercase())));
        }
        (!terms.is_empty()).then(|| terms.join(" AND "))
    }
}

#[derive(Debug, Clone)]
pub struct SearchRequest {
    pub query: String,
    pub top_k: usize,
    pub mode: SearchMode,
    pub filter: SearchFilter,
}

impl SearchRequest {
    pub fn validate(&self) -> RagResult<()> {
        if self.query.trim().is_empty() {
            return Err(RagError::InvalidRequest {
                param: "query",
                message: "'query' must not be empty.".to_string(),
            });
        }
        if self.top_k == 0 || self.top_k > MAX_TOP_K {
            return Err(RagError::InvalidRequest {
                param: "top_k",
                message: format!("'top_k' must be between 1 and {MAX_TOP_K}."),
            });
        }
        Ok(())
    }
}

pub async fn search(
    rag: &Rag,
    site: &SiteName,
    request: &SearchRequest,
) -> RagResult<Vec<SearchHit>> {
    request.validate()?;
    let table = rag.store.site_table(site, &rag.embedder.id).await?;
    let filter = request.filter.predicate();
    let filter = filter.as_deref();
    let k = request.top_k;
    // Fusion looks deeper than the answer so that a hit ranked low by one
    // mode can still rise.
    let depth = (k * 4).max(40);
    let table = &table;
    let vector = |limit| async move {
        let query = rag.embed(vec![request.query.clone()]).await?;
        rag.store
            .vector_search(table, &query[0], limit, filter)
            .await
    };
    let hits = match request.mode {
        SearchMode::Vector => vector(k).await?,
        SearchMode::Fulltext => {
            rag.store
                .fulltext_search(table, &request.query, k, filter)
                .await?
        }
        SearchMode::Hybrid => {
            let by_vector = vector(depth).await?;
            let by_text = rag
                .store
                .fulltext_search(table, &request.query, depth, filter)
                .await?;
            let mut fused = reciprocal_rank_fusion(&[by_vector, by_text]);
            fused.truncate(k);
            fused
        }
    };
    Ok(hits)
}

/// Fuses rankings: each hit scores the sum of 1 / (60 + rank) over the
/// rankings it appears in (rank from 1).
pub fn reciprocal_rank_fusion(rankings: &[Vec<SearchHit>]) -> Vec<SearchHit> {
    let mut fused: HashMap<String, SearchHit> = HashMap::new();
    for ranking in rankings {
        for (rank, hit) in ranking.iter().enumerate() {
            let contribution = 1.0 / (RRF_K + rank as f32 + 1.0);
            fused
                .entry(hit.chunk_id.clone())
                .and_modify(|h| h.score += contribution)
                .or_insert_with(|| SearchHit {
                    score: contribution,
                    ..hit.clone()
                });
        }
    }
    let mut hits: Vec<SearchHit> = fused.into_values().collect();
    hits.sort_by(|a, b| {
        b.score
            .total_cmp(&a.score)
            .then_with(|| a.chunk_id.cmp(&b.chunk_id))
    });
    hits
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hit(id: &str) -> SearchHit {
        SearchHit {
            chunk_id: id.into(),
            url: String::new(),
            title: String::new(),
            heading: String::new(),
            text: String::new(),
            lang: None,
            updated: None,
            score: 0.0,
        }
    }

    #[test]
    fn fusion_rewards_agreement() {
        let fused = reciprocal_rank_fusion(&[
            vec![hit("a"), hit("b"), hit("c")],
            vec![hit("c"), hit("b"), hit("d")],
        ]);
        let order: Vec<&str> = fused.iter().map(|h| h.chunk_id.as_str()).collect();
        // c (ranks 3 and 1) edges out b (2 and 2); both beat single hits.
        assert_eq!(order, vec!["c", "b", "a", "d"]);
        assert!((fused[0].score - (1.0 / 63.0 + 1.0 / 61.0)).abs() < 1e-6);
    }

    #[test]
    fn filters_are_quoted() {
        let filter = SearchFilter {
            url_prefix: Some("https://x.com/it's".into()),
            lang: Some("EN".into()),
        };
        assert_eq!(
            filter.predicate().unwrap(),
            "starts_with(url, 'https://x.com/it''s') AND lang = 'en'"
        );
        assert!(SearchFilter::default().predicate().is_none());
    }
}
