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

/// The site named in the path, if the caller may use it.
async fn site_name(state: &AppState, principal: &Principal, site: &str) -> ApiResult<SiteName> {
    let site = SiteName::parse(site)?;
    state
        .gateway
        .check_site_access(principal, site.as_str())
        .await?;
    Ok(site)
}

type Caller = Extension<Arc<Principal>>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSite {
    pub name: String,
}

/// Sites the caller may see: a tenant's own, or all for an admin.
pub async fn list_sites(
    State(state): State<Arc<AppState>>,
    Extension(principal): Caller,
) -> ApiResult<Json<serde_json::Value>> {
    let store = state.gateway.rag_store()?;
    let owners: std::collections::HashMap<String, String> = match state.gateway.tenancy.clone() {
        Some(tenancy) => tenancy
            .ledger
            .site_owners()
            .await
            .map_err(ApiError::internal)?
            .into_iter()
            .collect(),
        None => Default::default(),
    };
    let data: Vec<_> = store
        .sites()
        .await?
        .into_iter()
        .filter(|id| principal.admin || owners.get(id) == Some(&principal.tenant))
        .map(|id| json!({ "id": id, "object": "site", "owner": owners.get(&id) }))
        .collect();
    Ok(Json(json!({ "object": "list", "data": data })))
}

/// Creates a site owned by the caller's tenant (an admin's sites have no
/// owner). A tenant cannot take over a site that exists: another tenant's,
/// or an admin's (which has no owner row).
pub async fn create_site(
    State(state): State<Arc<AppState>>,
    Extension(principal): Caller,
    ApiJson(request): ApiJson<CreateSite>,
) -> ApiResult<Response> {
    let site = SiteName::parse(&request.name)
        .map_err(|e| ApiError::invalid_param("name", e.to_string()))?;
    let rag = state.gateway.rag().await?;
    let exists = || RagError::SiteExists(site.as_str().to_string());
    let tenancy = state.gateway.tenancy.clone().filter(|_| !principal.admin);
    let mut claimed = false;
    if let Some(tenancy) = &tenancy {
        if rag.store.sites().await?.iter().any(|s| s == site.as_str()) {
            return Err(exists().into());
        }
        // Claimed first, so two tenants cannot race for one name: the
        // insert succeeds for one of them only.
        claimed = tenancy
            .ledger
            .claim_site(site.as_str(), &principal.tenant)
            .await
            .map_err(ApiError::internal)?;
        let owner = tenancy
            .ledger
            .site_owner(site.as_str())
            .await
            .map_err(ApiError::internal)?;
        if owner.as_deref() != Some(principal.tenant.as_str()) {
            return Err(exists().into());
        }
    }
    let created = rag
        .store
        .create_site(&site, rag.embedder.dimensions, &rag.embedder.id)
        .await;
    if let Err(error) = created {
        if let (true, Some(tenancy)) = (claimed, &tenancy) {
            // The name was free in the ledger but the site exists (an
            // admin's): the claim goes again.
            tenancy
                .ledger
                .release_site(site.as_str())
                .await
                .map_err(ApiError::internal)?;
        }
        return Err(error.into());
    }
    let body = json!({ "id": site.as_str(), "object": "site", "embedding_model": rag.embedder.id });
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
        json!({ "id": site.as_str(), "object": "site", "deleted": true }),
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
