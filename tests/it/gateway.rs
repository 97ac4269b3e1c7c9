//! The gateway called in process, as batch jobs and evals call it: the same
//! answer and the same one ledger row as over HTTP. Text completions and
//! embeddings go through the router like chat: remote embedders are priced
//! per input token, and a name gets only the deployments that serve its
//! endpoint.

use futures::StreamExt;
use qpai::gateway::wire::ChatCompletionRequest;
use qpai::gateway::{AnswerBody, Chunk, Hints, StreamItem};
use qpai::money::Usd;
use qpai::router::BreakerConfig;
use qpai::tenancy::Principal;
use serde_json::{Value, json};

use crate::common::CHAT_MODEL;
use crate::fake_upstream::{EMBEDDING_DIMENSIONS, PROMPT_TOKENS};
use crate::router::{call, router_app_on, rows};

fn greedy_chat(stream: bool) -> Value {
    json!({
        "model": CHAT_MODEL,
        "messages": [{"role": "user", "content": "Name a bread."}],
        "max_tokens": 6,
        "temperature": 0,
        "stream": stream,
    })
}

#[tokio::test]
async fn an_in_process_call_answers_and_bills_as_http_does() {
    let r = router_app_on(None, BreakerConfig::default()).await;
    let principal = Principal::open();
    let request: ChatCompletionRequest = serde_json::from_value(greedy_chat(false)).unwrap();
    let answer = r
        .gateway
        .chat(&principal, request, &Hints::default())
        .await
        .unwrap();
    assert_eq!(answer.route.deployment, CHAT_MODEL);
    assert_eq!(answer.route.attempts, 1);
    let AnswerBody::Whole { body, .. } = answer.body else {
        panic!("a whole answer was asked for");
    };
    let body = body.to_json();
    let text = body["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(!text.is_empty());
    let over_http = call(
        &r.app,
        "POST",
        "/v1/chat/completions",
        None,
        Some(greedy_chat(false)),
    )
    .await;
    assert_eq!(
        over_http.json()["choices"][0]["message"]["content"],
        text,
        "one path: the same greedy answer in process and over HTTP"
    );

    // Streamed in process: typed chunks, billed once the stream ends.
    let request: ChatCompletionRequest = serde_json::from_value(greedy_chat(true)).unwrap();
    let answer = r
        .gateway
        .chat(&principal, request, &Hints::default())
        .await
        .unwrap();
    let AnswerBody::Stream(mut chunks) = answer.body else {
        panic!("a stream was asked for");
    };
    let mut streamed = String::new();
    while let Some(item) = chunks.next().await {
        match item {
            StreamItem::Chunk(Chunk::Chat(chunk)) => {
                for choice in chunk.choices {
                    streamed.push_str(choice.delta.content.as_deref().unwrap_or(""));
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(streamed, text);
    drop(chunks);

    let rows = rows(&r.ledger, "default").await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].requests, 3, "one row per request: {rows:?}");
    let completion = body["usage"]["completion_tokens"].as_u64().unwrap();
    assert_eq!(rows[0].completion_tokens, 3 * completion);
}

#[tokio::test]
async fn remote_embeddings_are_routed_and_billed_per_input_token() {
    let r = router_app_on(None, BreakerConfig::default()).await;
    let body = json!({"model": "embed-remote", "input": ["crusty bread", "rye"], "encoding_format": "float"});
    let answer = call(&r.app, "POST", "/v1/embeddings", None, Some(body)).await;
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    assert_eq!(answer.header("x-qpai-deployment"), "embed-remote");
    assert_eq!(answer.header("x-qpai-provider"), "openai_compatible");
    let value = answer.json();
    assert_eq!(value["data"].as_array().unwrap().len(), 2);
    assert_eq!(
        value["data"][1]["embedding"].as_array().unwrap().len(),
        EMBEDDING_DIMENSIONS
    );
    let sent = r.upstream.last_body("embed-remote").unwrap();
    assert_eq!(sent["model"], "text-embedding-3-small");
    assert_eq!(sent["input"], json!(["crusty bread", "rye"]));
    // $0.02 per million input tokens, on the tokens the upstream reported.
    let cost = Usd(PROMPT_TOKENS * 20_000);
    assert_eq!(answer.header("x-qpai-cost-usd"), cost.to_string());
    let rows = rows(&r.ledger, "default").await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].prompt_tokens, PROMPT_TOKENS);
    assert_eq!(rows[0].cost, cost);

    // A chat model is no embedder, and an embedder takes no chat.
    let refused = call(
        &r.app,
        "POST",
        "/v1/embeddings",
        None,
        Some(json!({"model": "writer", "input": "x"})),
    )
    .await;
    assert_eq!(refused.status, 400);
    assert_eq!(refused.json()["error"]["param"], "model");
    assert!(
        refused.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no embedding deployment")
    );
    let refused = call(
        &r.app,
        "POST",
        "/v1/chat/completions",
        None,
        Some(crate::router::chat("embed-remote", false)),
    )
    .await;
    assert_eq!(
        refused.status,
        400,
        "{}",
        String::from_utf8_lossy(&refused.body)
    );
}

#[tokio::test]
async fn text_completions_route_to_deployments_that_serve_them() {
    let r = router_app_on(None, BreakerConfig::default()).await;
    let body = json!({"model": "texter", "prompt": "Bread is", "max_tokens": 5});
    let answer = call(&r.app, "POST", "/v1/completions", None, Some(body.clone())).await;
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    assert_eq!(answer.json()["choices"][0]["text"], "w0 w1 w2 ");
    assert_eq!(
        r.upstream.last_body("texter").unwrap()["prompt"],
        "Bread is"
    );

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let answer = call(&r.app, "POST", "/v1/completions", None, Some(streamed)).await;
    let events = crate::common::sse_data(&answer.body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    assert!(
        !events.iter().any(|e| e.contains("usage")),
        "the usage chunk was not asked for: {events:?}"
    );
    let billed = rows(&r.ledger, "default").await;
    assert_eq!(billed.len(), 1);
    assert_eq!(billed[0].requests, 2);
    assert_eq!(billed[0].completion_tokens, 6, "3 whole + 3 streamed");

    // `steady` serves chat only.
    let mut refused = body;
    refused["model"] = json!("steady");
    let answer = call(&r.app, "POST", "/v1/completions", None, Some(refused)).await;
    assert_eq!(answer.status, 400);
    assert!(
        answer.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("does not serve text completions"),
        "{}",
        answer.json()
    );
    assert_eq!(r.upstream.requests("steady"), 0);
    let rows = rows(&r.ledger, "default").await;
    assert_eq!(rows[0].requests, 2, "refused before any route: no row");
}
