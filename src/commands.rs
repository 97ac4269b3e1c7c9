//! The non-serving subcommands: `qpai models list|pull|show`.

use anyhow::Context;

use crate::catalog::Catalog;
use crate::catalog::fetch::ModelStore;
use crate::config::{GlobalArgs, ModelsCommand};

pub fn models(command: ModelsCommand, global: &GlobalArgs) -> anyhow::Result<()> {
    let catalog = Catalog::load(global.catalog.as_deref())?;
    let store = ModelStore::new(global.models_dir());
    match command {
        ModelsCommand::List => {
            println!(
                "{:<24} {:<11} {:<12} {:>8}  {:<8} DESCRIPTION",
                "ID", "KIND", "FORMAT", "CONTEXT", "LOCAL"
            );
            for entry in catalog.entries() {
                println!(
                    "{:<24} {:<11} {:<12} {:>8}  {:<8} {}",
                    entry.id,
                    format!("{:?}", entry.kind).to_lowercase(),
                    format!("{:?}", entry.format).to_lowercase(),
                    entry.context_length,
                    if store.is_present(entry) { "yes" } else { "no" },
                    entry.description
                );
            }
            Ok(())
        }
        ModelsCommand::Pull { ids } => {
            for id in ids {
                let entry = catalog.get(&id).with_context(|| {
                    format!("`{id}` is not in the catalog (see `qpai models list`)")
                })?;
                let path = store.pull(entry)?;
                println!("{id}: {}", path.display());
            }
            Ok(())
        }
        ModelsCommand::Show { id } => {
            let entry = catalog.get(&id).with_context(|| {
                format!("`{id}` is not in the catalog (see `qpai models list`)")
            })?;
            print!("{}", toml::to_string_pretty(entry)?);
            match store.local_path(entry) {
                Some(path) if store.is_present(entry) => println!("local = {:?} # verified", path),
                Some(path) => println!("local = {:?} # not pulled", path),
                None => println!("# local path decided by the hub cache"),
            }
            Ok(())
        }
    }
}
