//! Grounded answers (`rag`): the caller's site is searched for the last
//! user message, which is replaced by the grounded prompt (sources,
//! instructions, question); the sources become the answer's citations.

use super::Gateway;
use super::wire::{Citation, RagOptions};
use crate::error::{ApiError, ApiResult};
use crate::models::TemplateMessage;
use crate::rag::{SearchRequest, SiteName, prompt, search};
use crate::tenancy::Principal;

impl Gateway {
    /// The site a caller means by `name`: a tenant's key names sites in
    /// its tenant's namespace (where a site given to it before names were
    /// per tenant keeps its plain name), so another tenant's sites are out
    /// of its reach and look absent; an admin's key names any stored site
    /// (`NAME` or `NAME.TENANT`). A server without keys has one namespace.
    pub async fn site_for(&self, principal: &Principal, name: &str) -> ApiResult<SiteName> {
        if principal.admin {
            return Ok(SiteName::parse_stored(name)?);
        }
        let site = SiteName::parse(name)?;
        let Some(tenancy) = &self.tenancy else {
            return Ok(site);
        };
        let owner = tenancy
            .ledger
            .site_owner(site.as_str())
            .await
            .map_err(ApiError::internal)?;
        let given_plain = owner.as_deref() == Some(principal.tenant.as_str());
        Ok(site.of_tenant(&principal.tenant, given_plain)?)
    }

    /// Retrieves from the site for the last user message and replaces that
    /// message with the grounded prompt.
    pub(super) async fn ground(
        &self,
        principal: &Principal,
        options: &RagOptions,
        messages: &mut [TemplateMessage],
    ) -> ApiResult<Vec<Citation>> {
        let site = self
            .site_for(principal, &options.site)
            .await
            .map_err(|mut e| {
                e.param = Some("rag.site".into());
                e
            })?;
        let Some(question) = messages.iter_mut().rev().find(|m| m.role == "user") else {
            return Err(ApiError::invalid_param(
                "messages",
                "'rag' needs a user message to answer.",
            ));
        };
        let request = SearchRequest {
            query: question.content.clone(),
            top_k: options.top_k.unwrap_or(5),
            mode: options.mode.unwrap_or_default(),
            filter: options.filter.clone().unwrap_or_default(),
        };
        let rag = self.rag().await?;
        let hits = search::search(&rag, &site, &request).await.map_err(|e| {
            let mut error = ApiError::from(e);
            // The search's own parameters are the request's `rag.*`.
            if error.kind.is_client_error()
                && let Some(param) = &error.param
            {
                error.param = Some(if param == "query" {
                    "messages".to_string()
                } else {
                    format!("rag.{param}")
                });
            }
            error
        })?;
        question.content = prompt::render(&question.content, &hits).map_err(ApiError::internal)?;
        tracing::debug!(site = %site, sources = hits.len(), template = prompt::TEMPLATE_NAME, "grounded prompt");
        Ok(hits
            .into_iter()
            .enumerate()
            .map(|(i, hit)| Citation {
                index: i + 1,
                url: hit.url,
                title: hit.title,
                chunk_id: hit.chunk_id,
                score: hit.score,
            })
            .collect())
    }
}
