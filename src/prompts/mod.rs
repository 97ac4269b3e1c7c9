//! Prompt templates (`prompts/*.j2`, minijinja, versioned by file name),
//! rendered the same way wherever qpai writes a prompt: the versioned
//! prompts clients name in requests and batch jobs (registry.rs,
//! template.rs), grounded answers, tool lists.

pub mod cli;
pub mod registry;
pub mod template;

pub use registry::{PromptSummary, Prompts};
pub use template::{PromptTemplate, Rendered};

use minijinja::Environment;
use minijinja::syntax::SyntaxConfig;

/// Renders the template `source` (named `name` in errors) with `context`.
pub fn render(
    name: &str,
    source: &str,
    context: minijinja::Value,
) -> Result<String, minijinja::Error> {
    let mut env = Environment::new();
    env.set_syntax(SyntaxConfig::builder().trim_blocks(true).build()?);
    env.add_template(name, source)?;
    env.get_template(name)?.render(context)
}
