//! Limits on what one request, and one tenant, may ask for: the message
//! and tool counts of a chat request, a tenant's cap on max_tokens (and the
//! cap as the default), and a tenant's most streams open at once. Each
//! refusal is a 4xx envelope naming its parameter.

use axum::http::StatusCode;
use futures::StreamExt;
use qpai::ledger::NewKey;
use serde_json::{Value, json};

use crate::fake_upstream::Behaviour;
use qpai::router::BreakerConfig;

use crate::router::{call, router_app_on};

fn chat(max_tokens: Option<u64>, stream: bool) -> Value {
    let mut body = json!({"model": "steady", "stream": stream,
        "messages": [{"role": "user", "content": "Write a tagline."}]});
    if let Some(n) = max_tokens {
        body["max_tokens"] = json!(n);
    }
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_and_tenant_limits_are_refused_by_name() {
    let r = router_app_on(None, BreakerConfig::default()).await;
    let new = NewKey {
        tenant: "acme".into(),
        max_tokens_cap: Some(50),
        max_streams: Some(2),
        ..NewKey::default()
    };
    let (acme, _) = r.ledger.create_key(&new).await.unwrap();
    let (free, _) = r
        .ledger
        .create_key(&NewKey {
            tenant: "globex".into(),
            ..NewKey::default()
        })
        .await
        .unwrap();
    r.tenancy.refresh().await;
    r.upstream.set(
        "steady",
        Behaviour::Answer {
            completion_tokens: 5,
        },
    );
    let post = |key: &str, body: Value| {
        let (app, key) = (r.app.clone(), key.to_string());
        async move { call(&app, "POST", "/v1/chat/completions", Some(&key), Some(body)).await }
    };
    let refused = |answer: &crate::router::Answer, status: StatusCode, param: &str| {
        assert_eq!(
            answer.status,
            status,
            "{}",
            String::from_utf8_lossy(&answer.body)
        );
        assert_eq!(answer.json()["error"]["param"], param);
    };

    // max_tokens over the tenant's cap: 400; none named: the cap is sent.
    refused(
        &post(&acme, chat(Some(51), false)).await,
        StatusCode::BAD_REQUEST,
        "max_tokens",
    );
    let mut over = chat(None, false);
    over["max_completion_tokens"] = json!(400);
    refused(
        &post(&acme, over).await,
        StatusCode::BAD_REQUEST,
        "max_completion_tokens",
    );
    let text = json!({"model": "steady", "prompt": "Hi", "max_tokens": 60});
    let answer = call(&r.app, "POST", "/v1/completions", Some(&acme), Some(text)).await;
    refused(&answer, StatusCode::BAD_REQUEST, "max_tokens");
    assert_eq!(
        post(&acme, chat(Some(50), false)).await.status,
        StatusCode::OK
    );
    assert_eq!(post(&acme, chat(None, false)).await.status, StatusCode::OK);
    assert_eq!(r.upstream.last_body("steady").unwrap()["max_tokens"], 50);
    // Another tenant has no cap.
    assert_eq!(
        post(&free, chat(Some(400), false)).await.status,
        StatusCode::OK
    );

    // Messages and tools per request.
    let mut many = chat(Some(5), false);
    many["messages"] = json!(vec![json!({"role": "user", "content": "hi"}); 2049]);
    refused(
        &post(&free, many).await,
        StatusCode::BAD_REQUEST,
        "messages",
    );
    let tool =
        json!({"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}});
    let mut tools = chat(Some(5), false);
    tools["tools"] = json!(vec![tool; 129]);
    refused(&post(&free, tools).await, StatusCode::BAD_REQUEST, "tools");

    // Two streams open at once; the third waits for one to end. (The
    // upstream answers within the test router's 400 ms first-byte timeout.)
    r.upstream.set(
        "steady",
        Behaviour::SlowAnswer {
            completion_tokens: 5,
            ms: 350,
        },
    );
    let open: Vec<_> = (0..2)
        .map(|_| tokio::spawn(post(&acme, chat(Some(5), true))))
        .collect();
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let third = post(&acme, chat(Some(5), true)).await;
    refused(&third, StatusCode::TOO_MANY_REQUESTS, "stream");
    assert_eq!(third.json()["error"]["code"], "too_many_streams");
    // Whole answers and other tenants are not held back.
    r.upstream.set(
        "steady",
        Behaviour::Answer {
            completion_tokens: 5,
        },
    );
    assert_eq!(
        post(&acme, chat(Some(5), false)).await.status,
        StatusCode::OK
    );
    assert_eq!(
        post(&free, chat(Some(5), true)).await.status,
        StatusCode::OK
    );
    for stream in futures::stream::iter(open)
        .then(|s| s)
        .collect::<Vec<_>>()
        .await
    {
        assert_eq!(stream.unwrap().status, StatusCode::OK);
    }
    assert_eq!(
        post(&acme, chat(Some(5), true)).await.status,
        StatusCode::OK
    );
}
