//! qpai's own prompt templates (`prompts/*.j2`, minijinja, versioned by
//! file name), rendered the same way wherever qpai writes a prompt itself:
//! grounded answers, tool lists.

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
