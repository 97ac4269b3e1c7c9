//! Versioned prompts over HTTP: listed, named in chat requests (rendered
//! exactly as if the client had written the turns), their response_format
//! applied, every bad reference refused by name, and the ledger grouping
//! spend by prompt.

use axum::http::StatusCode;
use serde_json::{Value, json};

use crate::common::CHAT_MODEL;
use crate::router::{call, keys, router_app_on};

#[tokio::test]
async fn a_named_prompt_answers_as_its_written_turns_and_is_recorded() {
    let r = router_app_on(None, Default::default()).await;
    let (acme, _, _) = keys(&r, None, None).await;
    let listed = call(&r.app, "GET", "/v1/prompts", Some(&acme), None)
        .await
        .json();
    let ids: Vec<&str> = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [
            "faq",
            "product_description",
            "rag_answer",
            "seo_meta",
            "translation"
        ]
    );
    let versions = call(
        &r.app,
        "GET",
        "/v1/prompts/product_description",
        Some(&acme),
        None,
    )
    .await
    .json();
    assert_eq!(versions["versions"].as_array().unwrap().len(), 2);
    assert_eq!(versions["versions"][1]["variables"]["words"]["default"], 80);

    let variables = json!({"product": "Tulip bulbs", "features": ["red", "hardy"], "words": 40});
    let named = call(
        &r.app,
        "POST",
        "/v1/chat/completions",
        Some(&acme),
        Some(
            json!({"model": CHAT_MODEL, "max_tokens": 12, "temperature": 0,
            "prompt": {"id": "product_description", "version": "2", "variables": variables}}),
        ),
    )
    .await;
    assert_eq!(
        named.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&named.body)
    );
    let template = qpai::prompts::Prompts::built_in()
        .get("product_description", Some("2"))
        .unwrap();
    let rendered = template.render(variables.as_object().unwrap()).unwrap();
    assert!(
        rendered
            .user
            .contains("at most 40 words for \"Tulip bulbs\"")
    );
    let written = call(
        &r.app,
        "POST",
        "/v1/chat/completions",
        Some(&acme),
        Some(
            json!({"model": CHAT_MODEL, "max_tokens": 12, "temperature": 0, "messages": [
            {"role": "system", "content": rendered.system.unwrap()},
            {"role": "user", "content": rendered.user}]}),
        ),
    )
    .await;
    assert_eq!(
        named.json()["choices"][0]["message"]["content"],
        written.json()["choices"][0]["message"]["content"]
    );
    assert_eq!(named.json()["usage"], written.json()["usage"]);

    r.ledger.flush().await;
    let usage = call(
        &r.app,
        "GET",
        "/v1/usage?group_by=prompt",
        Some(&acme),
        None,
    )
    .await
    .json();
    let by_prompt: Vec<(String, u64)> = usage["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            (
                row["prompt"].as_str().unwrap().to_string(),
                row["requests"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        by_prompt,
        [(String::new(), 1), ("product_description@2".to_string(), 1)]
    );
}

#[tokio::test]
async fn a_prompts_response_format_applies_unless_the_request_sets_one() {
    let r = router_app_on(None, Default::default()).await;
    let (acme, _, _) = keys(&r, None, None).await;
    let answer = call(
        &r.app,
        "POST",
        "/v1/chat/completions",
        Some(&acme),
        Some(
            json!({"model": CHAT_MODEL, "max_tokens": 120, "temperature": 0,
            "prompt": {"id": "seo_meta", "variables": {"page": "Tulip bulbs",
                "summary": "Spring tulip bulbs in twelve colours, shipped in autumn."}}}),
        ),
    )
    .await;
    assert_eq!(
        answer.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    let content = answer.json()["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    if answer.json()["choices"][0]["finish_reason"] == "stop" {
        let meta: Value = serde_json::from_str(&content).unwrap();
        let keys: Vec<&String> = meta.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["description", "title"], "{content}");
        assert!(meta["title"].as_str().unwrap().chars().count() <= 60);
    } else {
        assert!(content.starts_with("{\"title\": \""), "{content}");
    }
}

#[tokio::test]
async fn bad_prompt_references_are_refused_by_name() {
    let r = router_app_on(None, Default::default()).await;
    let (acme, _, _) = keys(&r, None, None).await;
    for (prompt, param) in [
        (json!({"id": "nope"}), "prompt.id"),
        (json!({"id": "faq", "version": "7"}), "prompt.version"),
        (json!({"id": "faq", "version": [1]}), "prompt.version"),
        (
            json!({"id": "faq", "variables": {"text": "t"}}),
            "prompt.variables.topic",
        ),
        (
            json!({"id": "faq", "variables": {"topic": "t", "text": "t", "count": "three"}}),
            "prompt.variables.count",
        ),
        (
            json!({"id": "faq", "variables": {"topic": "t", "text": "t", "colour": 1}}),
            "prompt.variables.colour",
        ),
        (json!({"id": "faq", "vars": {}}), "prompt.vars"),
    ] {
        let answer = call(
            &r.app,
            "POST",
            "/v1/chat/completions",
            Some(&acme),
            Some(json!({"model": CHAT_MODEL, "prompt": prompt})),
        )
        .await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{prompt}");
        assert_eq!(answer.json()["error"]["param"], param, "{prompt}");
    }
    let missing = call(&r.app, "GET", "/v1/prompts/nope", Some(&acme), None).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
}
