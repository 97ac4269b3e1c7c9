//! `/v1/files` over HTTP: multipart uploads as clients send them, tenants
//! kept apart (another tenant's file is absent), and bad forms refused by
//! name. The official client's flow is in tests/python/test_openai_client.py.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

use crate::router::{RouterApp, call, keys, router_app_on};

pub const BOUNDARY: &str = "qpai-test-boundary";

/// A multipart form of text fields and one file part.
pub fn form(fields: &[(&str, &str)], file: Option<(&str, &[u8])>) -> Vec<u8> {
    let mut body = Vec::new();
    for (name, value) in fields {
        body.extend_from_slice(
            format!(
                "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
            )
            .as_bytes(),
        );
    }
    if let Some((filename, content)) = file {
        body.extend_from_slice(
            format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\nContent-Type: application/jsonl\r\n\r\n").as_bytes(),
        );
        body.extend_from_slice(content);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    body
}

pub async fn upload(r: &RouterApp, key: &str, body: Vec<u8>) -> (StatusCode, Value) {
    let request = Request::post("/v1/files")
        .header("authorization", format!("Bearer {key}"))
        .header(
            "content-type",
            format!("multipart/form-data; boundary={BOUNDARY}"),
        )
        .body(Body::from(body))
        .unwrap();
    let response = r.app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn files_belong_to_their_tenant_and_bad_forms_are_named() {
    let r = router_app_on(None, Default::default()).await;
    let (acme, globex, _) = keys(&r, None, None).await;
    let lines = b"{\"custom_id\": \"a\"}\n{\"custom_id\": \"b\"}\n";
    let (status, file) = upload(
        &r,
        &acme,
        form(&[("purpose", "batch")], Some(("in.jsonl", lines))),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{file}");
    let id = file["id"].as_str().unwrap();
    assert_eq!(file["bytes"], lines.len());

    let path = format!("/v1/files/{id}/content");
    let mine = call(&r.app, "GET", &path, Some(&acme), None).await;
    assert_eq!(mine.body, lines);
    for (method, path) in [
        ("GET", format!("/v1/files/{id}")),
        ("GET", path.clone()),
        ("DELETE", format!("/v1/files/{id}")),
    ] {
        let theirs = call(&r.app, method, &path, Some(&globex), None).await;
        assert_eq!(theirs.status, StatusCode::NOT_FOUND, "{method} {path}");
        assert_eq!(theirs.json()["error"]["code"], "file_not_found");
    }
    let listed = call(&r.app, "GET", "/v1/files", Some(&globex), None).await;
    assert_eq!(listed.json()["data"], serde_json::json!([]));

    let cases: [(Vec<u8>, &str); 5] = [
        (form(&[("purpose", "batch")], None), "file"),
        (form(&[], Some(("in.jsonl", lines))), "purpose"),
        (
            form(&[("purpose", "batch_output")], Some(("in.jsonl", lines))),
            "purpose",
        ),
        (
            form(
                &[("purpose", "batch"), ("colour", "red")],
                Some(("in.jsonl", lines)),
            ),
            "colour",
        ),
        (
            form(
                &[("purpose", "batch"), ("expires_after[seconds]", "soon")],
                Some(("in.jsonl", lines)),
            ),
            "expires_after.seconds",
        ),
    ];
    for (body, param) in cases {
        let (status, error) = upload(&r, &acme, body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{param}: {error}");
        assert_eq!(error["error"]["param"], param, "{error}");
    }
    let still = call(&r.app, "GET", &path, Some(&acme), None).await;
    assert_eq!(still.body, lines, "bad uploads lose nothing");
}
