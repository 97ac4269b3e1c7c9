//! Sites and their search: `/v1/sites` (list, create), `/v1/sites/{site}`
//! (stats, delete), `/v1/sites/{site}/documents` (ingest records) and
//! `/v1/sites/{site}/search`.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::mpsc;

use super::AppState;
use super::extract::ApiJson;
use crate::error::{ApiError, ApiResult};
use crate::rag::ingest::{IngestOptions, Reader, from_documents, ingest, spawn_reader};
use crate::rag::sources::jsonl::Record;
use crate::rag::sources::{ReadOptions, SourceItem};
use crate::rag::{RagError, SearchFilter, SearchMode, SearchRequest, SiteName, search};
use crate::tenancy::Principal;

/// Records per ingest request.
const MAX_DOCUMENTS: usize = 1000;

/// The site the caller means by the name in the path.
async fn site_name(state: &AppState, principal: &Principal, site: &str) -> ApiResult<SiteName> {
    state.gateway.site_for(principal, site).await
}

type Caller = Extension<Arc<Principal>>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSite {
    pub name: String,
}

/// Sites the caller may see: a tenant's own, by the names it gave them, or
/// every stored site for an admin, with its owner.
pub async fn list_sites(
    State(state): State<Arc<AppState>>,
    Extension(principal): Caller,
) -> ApiResult<Json<serde_json::Value>> {
    let store = state.gateway.rag_store()?;
    // Sites given to a tenant before names were per tenant.
    let given: std::collections::HashMap<String, String> = match state.gateway.tenancy.clone() {
        Some(tenancy) => tenancy
            .ledger
            .site_owners()
            .await
            .map_err(ApiError::internal)?
            .into_iter()
            .collect(),
        None => Default::default(),
    };
    let mut data = Vec::new();
    for stored in store.sites().await? {
        let Ok(site) = SiteName::parse_stored(&stored) else {
            continue;
        };
        let owner = site.tenant().or(given.get(&stored).map(String::as_str));
        if principal.admin {
            data.push(json!({ "id": stored, "object": "site", "owner": owner }));
        } else if owner == Some(principal.tenant.as_str()) {
            data.push(json!({ "id": site.local_name(), "object": "site" }));
        }
    }
    Ok(Json(json!({ "object": "list", "data": data })))
}

/// Creates a site in the caller's namespace: a tenant's, or for an admin's
/// key any stored name (a plain one, which no tenant sees, or `NAME.TENANT`
/// for a tenant). Another tenant's names neither block nor show.
pub async fn create_site(
    State(state): State<Arc<AppState>>,
    Extension(principal): Caller,
    ApiJson(request): ApiJson<CreateSite>,
) -> ApiResult<Response> {
    let site = state
        .gateway
        .site_for(&principal, &request.name)
        .await
        .map_err(|mut e| {
            e.param = Some("name".into());
            e
        })?;
    let rag = state.gateway.rag().await?;
    rag.store
        .create_site(&site, rag.embedder.dimensions, &rag.embedder.id)
        .await?;
    let body =
        json!({ "id": site.to_string(), "object": "site", "embedding_model": rag.embedder.id });
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

pub async fn site_stats(
    State(state): State<Arc<AppState>>,
    Extension(principal): Caller,
    Path(site): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    let site = site_name(&state, &principal, &site).await?;
    let stats = state.gateway.rag_store()?.stats(&site).await?;
    let mut body = serde_json::to_value(stats).map_err(ApiError::internal)?;
    body["object"] = json!("site");
    Ok(Json(body))
}

pub async fn delete_site(
    State(state): State<Arc<AppState>>,
    Extension(principal): Caller,
    Path(site): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    let site = site_name(&state, &principal, &site).await?;
    state.gateway.rag_store()?.delete_site(&site).await?;
    if let Some(tenancy) = state.gateway.tenancy.clone() {
        tenancy
            .ledger
            .release_site(site.as_str())
            .await
            .map_err(ApiError::internal)?;
    }
    Ok(Json(
        json!({ "id": site.to_string(), "object": "site", "deleted": true }),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchBody {
    pub query: String,
    pub top_k: Option<usize>,
    pub mode: Option<SearchMode>,
    pub filter: Option<SearchFilter>,
}

impl SearchBody {
    pub fn into_request(self) -> SearchRequest {
        SearchRequest {
            query: self.query,
            top_k: self.top_k.unwrap_or(5),
            mode: self.mode.unwrap_or_default(),
            filter: self.filter.unwrap_or_default(),
        }
    }
}

pub async fn search_site(
    State(state): State<Arc<AppState>>,
    Extension(principal): Caller,
    Path(site): Path<String>,
    ApiJson(body): ApiJson<SearchBody>,
) -> ApiResult<Json<serde_json::Value>> {
    let site = site_name(&state, &principal, &site).await?;
    // An absent site is named before the embedding model is needed.
    if !state.gateway.rag_store()?.exists(&site).await? {
        return Err(RagError::SiteNotFound(site.to_string()).into());
    }
    let rag = state.gateway.rag().await?;
    let hits = search::search(&rag, &site, &body.into_request()).await?;
    Ok(Json(json!({ "object": "list", "results": hits })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestBody {
    /// Records (`url` and one of `text`, `html`, `markdown`, ...).
    pub documents: Option<Vec<serde_json::Value>>,
    /// Or an http(s) sitemap, fetched by the server with the CLI's limits.
    pub sitemap_url: Option<String>,
    /// Delete pages of this source (the API's records, or this sitemap) that it no longer has.
    #[serde(default)]
    pub prune: bool,
}

/// Records checked one by one: a bad record is reported, the others ingested.
fn records(documents: Vec<serde_json::Value>) -> ApiResult<(mpsc::Receiver<SourceItem>, Reader)> {
    if documents.is_empty() || documents.len() > MAX_DOCUMENTS {
        return Err(ApiError::invalid_param(
            "documents",
            format!("'documents' must hold 1 to {MAX_DOCUMENTS} records."),
        ));
    }
    let options = ReadOptions::default();
    let items = documents
        .into_iter()
        .enumerate()
        .map(|(i, value)| SourceItem {
            origin: format!("documents[{i}]"),
            document: serde_json::from_value::<Record>(value)
                .map_err(|e| format!("bad record: {e}"))
                .and_then(|r| r.into_document(&options)),
        })
        .collect();
    Ok(from_documents(items))
}

/// A sitemap URL whose host resolves to an address the server may not
/// fetch from is refused up front, naming the parameter (hosts that
/// redirect there are refused hop by hop while fetching).
async fn check_fetch_address(state: &AppState, url: &str) -> ApiResult<()> {
    let refuse = |message: String| ApiError::invalid_param("sitemap_url", message);
    let parsed = url::Url::parse(url).map_err(|e| refuse(format!("'sitemap_url': {e}.")))?;
    let (Some(host), Some(port)) = (parsed.host_str(), parsed.port_or_known_default()) else {
        return Err(refuse("'sitemap_url' needs a host.".to_string()));
    };
    let netloc = format!("{host}:{port}");
    let policy = state.config.fetch.clone();
    tokio::task::spawn_blocking(move || policy.resolve(&netloc))
        .await
        .map_err(ApiError::internal)?
        .map_err(|e| refuse(format!("'sitemap_url': {e}.")))?;
    Ok(())
}

pub async fn ingest_documents(
    State(state): State<Arc<AppState>>,
    Extension(principal): Caller,
    Path(site): Path<String>,
    ApiJson(body): ApiJson<IngestBody>,
) -> ApiResult<Json<serde_json::Value>> {
    let site = site_name(&state, &principal, &site).await?;
    let (reader, source_id) = match (body.documents, body.sitemap_url) {
        (Some(documents), None) => (records(documents)?, "api".to_string()),
        (None, Some(url)) => {
            // The server reads no local files for its clients: URLs only.
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(ApiError::invalid_param(
                    "sitemap_url",
                    "'sitemap_url' must be an http(s) URL.",
                ));
            }
            check_fetch_address(&state, &url).await?;
            let mut options = ReadOptions::default();
            options.fetch.policy = state.config.fetch.clone();
            (spawn_reader(url.clone(), options), url)
        }
        _ => {
            return Err(ApiError::invalid_param(
                "documents",
                "Give exactly one of 'documents' and 'sitemap_url'.",
            ));
        }
    };
    let rag = state.gateway.rag().await?;
    let options = IngestOptions {
        source_id,
        prune: body.prune,
        ann_min_rows: 20_000,
    };
    let report = ingest(
        &rag,
        &site,
        reader,
        &options,
        &indicatif::ProgressBar::hidden(),
    )
    .await?;
    let mut body = serde_json::to_value(report).map_err(ApiError::internal)?;
    body["object"] = json!("site.ingest");
    Ok(Json(body))
}
