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

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// transformers' `strftime_now` (used by Llama 3 templates for the date), in
/// UTC, for the common directives: %Y %y %m %d %B %b %H %M %S %%.
fn strftime_now(format: &str, unix: i64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let days = unix.div_euclid(86_400);
    let seconds = unix.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('B') => out.push_str(MONTHS[(month - 1) as usize]),
            Some('b') => out.push_str(&MONTHS[(month - 1) as usize][..3]),
            Some('H') => out.push_str(&format!("{:02}", seconds / 3600)),
            Some('M') => out.push_str(&format!("{:02}", seconds / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", seconds % 60)),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
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
        env.add_function("strftime_now", |format: String| {
            strftime_now(&format, now_unix())
        });
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strftime_now_formats_dates_in_utc() {
        // 2024-02-29 13:05:09 UTC
        assert_eq!(
            strftime_now("%d %b %Y %H:%M:%S", 1_709_211_909),
            "29 Feb 2024 13:05:09"
        );
        assert_eq!(strftime_now("%B %y %m %%", 0), "January 70 01 %");
    }

    #[test]
    fn templates_can_call_raise_exception_and_strftime_now() {
        let template = ChatTemplate::new(
            "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}\
             Today: {{ strftime_now('%Y') }} {{ messages[0]['content'] | trim }}"
                .to_string(),
            String::new(),
            String::new(),
        )
        .unwrap();
        let user = |role: &str| TemplateMessage {
            role: role.to_string(),
            content: "  hi  ".to_string(),
            name: None,
        };
        let rendered = template.render(&[user("user")], true).unwrap();
        assert!(
            rendered.starts_with("Today: 20") && rendered.ends_with(" hi"),
            "{rendered}"
        );
        match template.render(&[user("assistant")], true) {
            Err(TemplateError::Rejected(message)) => assert_eq!(message, "first must be user"),
            other => panic!("{other:?}"),
        }
    }
}
