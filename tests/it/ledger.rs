//! The ledger database on SQLite and on PostgreSQL (a real server:
//! scripts/postgres.sh starts one and scripts/test.sh passes its URL as
//! QPAI_TEST_DATABASE_URL): the same schema, keys stored hashed, and
//! totals that equal the sum of the rows to the pico-dollar.

use qpai::ledger::{GroupKey, Ledger, NewKey, Outcome, UsageQuery, UsageRecord, UsageSource};
use qpai::money::Usd;
use rand::{Rng, SeedableRng};

/// The PostgreSQL to test against; CI must have one.
fn postgres_url() -> Option<String> {
    let url = std::env::var("QPAI_TEST_DATABASE_URL")
        .ok()
        .filter(|u| !u.is_empty());
    if url.is_none() && std::env::var_os("CI").is_some() {
        panic!("CI runs the PostgreSQL tests: set QPAI_TEST_DATABASE_URL (scripts/postgres.sh)");
    }
    url
}

async fn databases() -> Vec<(String, Ledger, Option<tempfile::TempDir>)> {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = format!("sqlite://{}", dir.path().join("ledger.db").display());
    let mut all = vec![(
        "sqlite".to_string(),
        Ledger::open(&sqlite).await.unwrap(),
        Some(dir),
    )];
    if let Some(url) = postgres_url() {
        all.push((
            "postgres".to_string(),
            Ledger::open(&url).await.unwrap(),
            None,
        ));
    }
    all
}

fn record(i: usize, tenant: &str, rng: &mut rand::rngs::StdRng) -> UsageRecord {
    let day_ms = 86_400_000;
    UsageRecord {
        request_id: format!("{tenant}-{i}"),
        ts_ms: 1_780_000_000_000 + (i as i64 % 3) * day_ms,
        tenant: tenant.into(),
        key_id: format!("key_{}", i % 2),
        endpoint: qpai::router::Endpoint::ChatCompletions,
        requested_model: "writer".into(),
        deployment: ["a", "b", "c"][i % 3].into(),
        provider: Some(
            [
                qpai::router::ProviderKind::Local,
                qpai::router::ProviderKind::Openai,
                qpai::router::ProviderKind::Azure,
            ][i % 3],
        ),
        model: ["small", "gpt-4o-mini", "gpt-4o"][i % 3].into(),
        prompt_tokens: rng.random_range(1..5000),
        completion_tokens: rng.random_range(0..2000),
        // Odd amounts, up to a dollar: float sums would drift.
        cost: Usd(rng.random_range(1..1_000_000_000_000)),
        outcome: Outcome::Ok,
        attempts: 1,
        stream: i.is_multiple_of(2),
        usage_source: UsageSource::Upstream,
        batch_id: None,
        prompt: None,
        eval_run: None,
        budget_hold: None,
    }
}

#[tokio::test]
async fn totals_equal_the_sum_of_the_rows_exactly() {
    for (backend, ledger, _dir) in databases().await {
        let tenant = format!("t{}", uuid::Uuid::new_v4().simple());
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let records: Vec<_> = (0..1000).map(|i| record(i, &tenant, &mut rng)).collect();
        let recorded: Vec<_> = records.iter().map(|r| ledger.record(r.clone())).collect();
        // The same request recorded twice is one row.
        ledger.record(records[0].clone()).committed().await;
        for row in recorded {
            row.committed().await;
        }
        let exact: u128 = records.iter().map(|r| u128::from(r.cost.0)).sum();
        for group_by in [
            vec![],
            vec![GroupKey::Model],
            vec![GroupKey::Day, GroupKey::Provider],
            vec![GroupKey::Key],
        ] {
            let rows = ledger
                .usage(&UsageQuery {
                    tenant: Some(tenant.clone()),
                    group_by: group_by.clone(),
                    ..UsageQuery::default()
                })
                .await
                .unwrap();
            let total: u128 = rows.iter().map(|r| u128::from(r.cost.0)).sum();
            assert_eq!(total, exact, "{backend} {group_by:?}");
            assert_eq!(
                rows.iter().map(|r| r.requests).sum::<u64>(),
                1000,
                "{backend}"
            );
            let tokens: u64 = records.iter().map(|r| r.prompt_tokens).sum();
            assert_eq!(rows.iter().map(|r| r.prompt_tokens).sum::<u64>(), tokens);
        }
        let by_day = ledger
            .usage(&UsageQuery {
                tenant: Some(tenant.clone()),
                group_by: vec![GroupKey::Day],
                ..UsageQuery::default()
            })
            .await
            .unwrap();
        let days: Vec<&str> = by_day.iter().map(|r| r.group["day"].as_str()).collect();
        assert_eq!(
            days,
            ["2026-05-28", "2026-05-29", "2026-05-30"],
            "{backend}"
        );
        let one_day = ledger
            .usage(&UsageQuery {
                tenant: Some(tenant.clone()),
                from_day: Some("2026-05-29".into()),
                to_day: Some("2026-05-29".into()),
                ..UsageQuery::default()
            })
            .await
            .unwrap();
        assert_eq!(one_day[0].requests, by_day[1].requests);
        assert_eq!(
            ledger.spent_since(&tenant, 0).await.unwrap().0 as u128,
            exact,
            "{backend}"
        );
    }
}

#[tokio::test]
async fn keys_are_stored_hashed_and_found_by_their_secret() {
    for (backend, ledger, _dir) in databases().await {
        let tenant = format!("t{}", uuid::Uuid::new_v4().simple());
        let (secret, record) = ledger
            .create_key(&NewKey {
                tenant: tenant.clone(),
                monthly_budget: Some(Usd::parse("12.5").unwrap()),
                rpm: Some(60),
                min_quality: Some(0.7),
                ..NewKey::default()
            })
            .await
            .unwrap();
        assert!(secret.starts_with("qpai-") && secret.len() > 40);
        let found = ledger.key_by_secret(&secret).await.unwrap().unwrap();
        assert_eq!(found, record, "{backend}");
        assert!(
            ledger
                .key_by_secret(&format!("{secret}x"))
                .await
                .unwrap()
                .is_none()
        );
        let stored = ledger
            .db()
            .query(
                "SELECT hash FROM api_keys WHERE id = $1",
                vec![record.id.as_str().into()],
            )
            .await
            .unwrap();
        let hash = stored[0][0].text().unwrap();
        assert!(
            !hash.contains(&secret[5..]) && hash.len() == 64,
            "{backend}: only the hash is kept"
        );
        let tenant_row = ledger.tenant(&tenant).await.unwrap().unwrap();
        assert_eq!(tenant_row.monthly_budget, Some(Usd::parse("12.5").unwrap()));
        assert_eq!(tenant_row.min_quality, Some(0.7));
        // A second key keeps the tenant's budget unless it sets one.
        ledger
            .create_key(&NewKey {
                tenant: tenant.clone(),
                ..NewKey::default()
            })
            .await
            .unwrap();
        assert_eq!(
            ledger
                .tenant(&tenant)
                .await
                .unwrap()
                .unwrap()
                .monthly_budget,
            Some(Usd::parse("12.5").unwrap())
        );
        assert!(ledger.revoke_key(&record.id).await.unwrap());
        assert!(
            ledger.key_by_secret(&secret).await.unwrap().is_none(),
            "{backend}"
        );
        assert!(
            ledger
                .create_key(&NewKey {
                    tenant: "bad name!".into(),
                    ..NewKey::default()
                })
                .await
                .is_err()
        );
    }
}

#[tokio::test]
async fn the_budget_holds_under_concurrency_on_postgres() {
    let Some(url) = postgres_url() else {
        eprintln!("QPAI_TEST_DATABASE_URL is not set: the PostgreSQL variant is skipped");
        return;
    };
    crate::router::budget_holds_under_concurrency(Some(url)).await;
}

#[tokio::test]
async fn sslmode_require_never_falls_back_to_plain_text() {
    let Some(url) = postgres_url() else {
        return;
    };
    // The test server speaks no TLS: `prefer` (the default) connects in
    // plain text, `require` must refuse rather than fall back.
    let separator = if url.contains('?') { '&' } else { '?' };
    let error = Ledger::open(&format!("{url}{separator}sslmode=require"))
        .await
        .err()
        .expect("require without a TLS server must fail");
    assert!(format!("{error:#}").contains("TLS"), "{error:#}");
}

#[tokio::test]
async fn processes_starting_together_migrate_a_fresh_postgres_once() {
    let Some(url) = postgres_url() else {
        return;
    };
    let admin = Ledger::open(&url).await.unwrap();
    let name = format!("qpai_migrate_{}", uuid::Uuid::new_v4().simple());
    admin
        .db()
        .execute_text(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    let fresh = match url.rsplit_once('/') {
        Some((server, _)) => format!("{server}/{name}"),
        None => unreachable!("a PostgreSQL URL names its database"),
    };
    let opened = futures::future::join_all((0..4).map(|_| Ledger::open(&fresh))).await;
    for ledger in &opened {
        assert!(ledger.is_ok(), "{:?}", ledger.as_ref().err());
    }
    let versions = opened[0]
        .as_ref()
        .unwrap()
        .db()
        .query(
            "SELECT version FROM schema_migrations ORDER BY version",
            vec![],
        )
        .await
        .unwrap();
    let versions: Vec<i64> = versions.iter().filter_map(|row| row[0].int()).collect();
    assert_eq!(
        versions,
        [1, 2, 3, 4, 5, 6, 7, 8],
        "each migration ran once"
    );
    drop(opened);
    admin
        .db()
        .execute_text(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .await
        .unwrap();
}
