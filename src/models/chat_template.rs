//! Chat templates: the Jinja template shipped with a model (GGUF metadata or
//! tokenizer_config.json), rendered with minijinja the way Hugging Face
//! transformers renders it (trim_blocks, lstrip_blocks, Python string methods,
//! `raise_exception`).

use minijinja::syntax::SyntaxConfig;
use minijinja::{Environment, ErrorKind, context};
use serde::Serialize;

const TEMPLATE_NAME: &str = "chat";

/// One message as the template sees it.
#[derive(Debug, Clone, Serialize)]
pub struct TemplateMessage {
    pub role: String,
    pub content: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// The template refused the conversation (`raise_exception`): the client's fault.
    #[error("{0}")]
    Rejected(String),
    /// The template itself is broken or uses something unsupported.
    #[error("chat template error: {0}")]
    Broken(String),
}

pub struct ChatTemplate {
    env: Environment<'static>,
    pub bos_token: String,
    pub eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").finish_non_exhaustive()
    }
}

impl ChatTemplate {
    pub fn new(
        source: String,
        bos_token: String,
        eos_token: String,
    ) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| TemplateError::Broken(e.to_string()))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_template_owned(TEMPLATE_NAME, source)
            .map_err(|e| TemplateError::Broken(e.to_string()))?;
        Ok(Self {
            env,
            bos_token,
            eos_token,
        })
    }

    pub fn render(
        &self,
        messages: &[TemplateMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TemplateError> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| TemplateError::Broken(e.to_string()))?;
        template
            .render(context! {
                messages => minijinja::value::Serde(messages),
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(|e| match e.kind() {
                ErrorKind::InvalidOperation => TemplateError::Rejected(
                    e.detail()
                        .unwrap_or("rejected by the chat template")
                        .to_string(),
                ),
                _ => TemplateError::Broken(e.to_string()),
            })
    }
}
