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
    /// Refuses `site` to a caller who does not own it: as "not found", so
    /// other tenants' site names do not leak. Sites with no owner belong to
    /// the admins.
    pub async fn check_site_access(&self, principal: &Principal, site: &str) -> ApiResult<()> {
        if principal.admin {
            return Ok(());
        }
        let owner = match &self.tenancy {
            Some(tenancy) => tenancy
                .ledger
                .site_owner(site)
                .await
                .map_err(ApiError::internal)?,
            None => return Ok(()),
        };
        if owner.as_deref() == Some(principal.tenant.as_str()) {
            Ok(())
        } else {
            Err(ApiError {
                code: Some("site_not_found"),
                param: Some("site".into()),
                ..ApiError::not_found(format!("No site named '{site}'."))
            })
        }
    }

    /// Retrieves from the site for the last user message and replaces that
    /// message with the grounded prompt.
    pub(super) async fn ground(
        &self,
        principal: &Principal,
        options: &RagOptions,
        messages: &mut [TemplateMessage],
    ) -> ApiResult<Vec<Citation>> {
        let site = SiteName::parse(&options.site)
            .map_err(|e| ApiError::invalid_param("rag.site", e.to_string()))?;
        self.check_site_access(principal, site.as_str())
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
