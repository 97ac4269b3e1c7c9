//! `qpai keys create|list|revoke` and `qpai usage`: the same database the
//! server uses (SQLite in the data dir, or `--database-url`).

use crate::config::{GlobalArgs, KeysCommand, UsageArgs};
use crate::ledger::{Ledger, NewKey, UsageQuery};
use crate::money::Usd;

pub async fn keys(command: KeysCommand, global: &GlobalArgs) -> anyhow::Result<()> {
    let ledger = Ledger::open(&global.database_url()).await?;
    match command {
        KeysCommand::Create(args) => {
            let monthly_budget = args
                .monthly_budget_usd
                .as_deref()
                .map(Usd::parse)
                .transpose()
                .map_err(|e| anyhow::anyhow!("--monthly-budget-usd: {e}"))?;
            let (secret, record) = ledger
                .create_key(&NewKey {
                    tenant: args.tenant,
                    monthly_budget,
                    soft_limit_percent: args.soft_limit_percent,
                    default_model: args.default_model,
                    min_quality: args.min_quality,
                    max_tokens_cap: args.max_tokens_cap,
                    max_streams: args.max_streams,
                    rpm: args.rpm,
                    tpm: args.tpm,
                    admin: args.admin,
                })
                .await?;
            eprintln!(
                "created {} for tenant {}{} (the key is shown once):",
                record.id,
                record.tenant,
                if record.admin { " (admin)" } else { "" }
            );
            println!("{secret}");
        }
        KeysCommand::List { tenant } => {
            println!(
                "{:<18} {:<16} {:<12} {:<6} {:>8} {:>10}  status",
                "id", "tenant", "prefix", "admin", "rpm", "tpm"
            );
            for key in ledger.list_keys(tenant.as_deref()).await? {
                let limit = |l: Option<u32>| l.map_or("-".to_string(), |n| n.to_string());
                println!(
                    "{:<18} {:<16} {:<12} {:<6} {:>8} {:>10}  {}",
                    key.id,
                    key.tenant,
                    key.prefix,
                    key.admin,
                    limit(key.rpm),
                    limit(key.tpm),
                    if key.revoked_ms.is_some() {
                        "revoked"
                    } else {
                        "live"
                    }
                );
            }
        }
        KeysCommand::Revoke { id } => {
            if !ledger.revoke_key(&id).await? {
                anyhow::bail!("no live key {id}");
            }
            eprintln!("revoked {id}");
        }
    }
    Ok(())
}

pub async fn usage(args: UsageArgs, global: &GlobalArgs) -> anyhow::Result<()> {
    let ledger = Ledger::open(&global.database_url()).await?;
    let group_by =
        crate::gateway::usage::group_keys(Some(&args.group_by)).map_err(anyhow::Error::msg)?;
    let rows = ledger
        .usage(&UsageQuery {
            tenant: args.tenant,
            key_id: None,
            from_day: args.from,
            to_day: args.to,
            group_by: group_by.clone(),
        })
        .await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    let mut header: Vec<String> = group_by.iter().map(|k| k.name().to_string()).collect();
    header.extend(["requests", "prompt_tokens", "completion_tokens", "cost_usd"].map(String::from));
    println!("{}", header.join("\t"));
    for row in &rows {
        let mut cells: Vec<String> = group_by
            .iter()
            .map(|k| row.group.get(k.name()).cloned().unwrap_or_default())
            .collect();
        cells.extend([
            row.requests.to_string(),
            row.prompt_tokens.to_string(),
            row.completion_tokens.to_string(),
            row.cost.to_string(),
        ]);
        println!("{}", cells.join("\t"));
    }
    let total = Usd(rows.iter().map(|r| r.cost.0).sum());
    println!(
        "total\t{} requests\t${total}",
        rows.iter().map(|r| r.requests).sum::<u64>()
    );
    Ok(())
}
