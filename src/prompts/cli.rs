//! `qpai prompts list|show|render|diff`.

use serde_json::{Map, Value};

use super::Prompts;
use super::registry::diff_lines;
use crate::config::{GlobalArgs, PromptsCommand, PromptsDir};

fn registry(dir: &PromptsDir, global: &GlobalArgs) -> anyhow::Result<Prompts> {
    let dir = dir
        .prompts_dir
        .clone()
        .unwrap_or_else(|| global.data_dir().join("prompts"));
    Prompts::load(&dir)
}

fn found(
    prompts: &Prompts,
    reference: &str,
) -> anyhow::Result<std::sync::Arc<super::PromptTemplate>> {
    prompts
        .get_reference(reference)
        .map_err(|e| anyhow::anyhow!(e.message))
}

pub fn run(command: PromptsCommand, global: &GlobalArgs) -> anyhow::Result<()> {
    match command {
        PromptsCommand::List(dir) => {
            for prompt in registry(&dir, global)?.list() {
                let versions: Vec<String> =
                    prompt.versions.iter().map(|v| format!("v{v}")).collect();
                println!(
                    "{:<22} {:<10} {}",
                    prompt.id,
                    versions.join(","),
                    prompt.description
                );
            }
        }
        PromptsCommand::Show { prompt, dir } => {
            print!("{}", found(&registry(&dir, global)?, &prompt)?.source);
        }
        PromptsCommand::Render {
            prompt,
            vars,
            vars_file,
            dir,
        } => {
            let template = found(&registry(&dir, global)?, &prompt)?;
            let mut given = match vars_file {
                Some(path) => match serde_json::from_str(&std::fs::read_to_string(&path)?)? {
                    Value::Object(map) => map,
                    _ => anyhow::bail!("{}: not a JSON object", path.display()),
                },
                None => Map::new(),
            };
            for pair in vars {
                let (name, text) = pair
                    .split_once('=')
                    .ok_or_else(|| anyhow::anyhow!("--var {pair:?}: expected NAME=VALUE"))?;
                let kind = template
                    .variables
                    .get(name)
                    .ok_or_else(|| {
                        anyhow::anyhow!("prompt {} has no variable {name:?}", template.reference())
                    })?
                    .kind;
                let value = kind.from_text(text).ok_or_else(|| {
                    anyhow::anyhow!("--var {name}: {text:?} is not a {}", kind.as_str())
                })?;
                given.insert(name.to_string(), value);
            }
            let rendered = template
                .render(&given)
                .map_err(|e| anyhow::anyhow!(e.message))?;
            if let Some(system) = rendered.system {
                println!("[system]\n{system}\n");
            }
            println!("[user]\n{}", rendered.user);
        }
        PromptsCommand::Diff { old, new, dir } => {
            let prompts = registry(&dir, global)?;
            let (old, new) = (found(&prompts, &old)?, found(&prompts, &new)?);
            println!("--- {}\n+++ {}", old.reference(), new.reference());
            print!("{}", diff_lines(&old.source, &new.source));
        }
    }
    Ok(())
}
