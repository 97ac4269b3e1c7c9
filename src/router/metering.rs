//! Reading usage out of answers as they pass: the `usage` of a JSON
//! completion, and for a stream the usage chunk (asked for upstream with
//! `stream_options.include_usage`) plus the text streamed so far, counted
//! when a stream ends without a report. A client that did not ask for the
//! usage chunk does not get it. Events are passed on whole, as they come.

use bytes::{Bytes, BytesMut};
use serde_json::Value;

/// Prompt and completion tokens.
pub type TokenUsage = (u64, u64);

/// The `usage` object of a completion or chunk.
pub fn usage_of(value: &Value) -> Option<TokenUsage> {
    let usage = value.get("usage")?;
    Some((
        usage.get("prompt_tokens")?.as_u64()?,
        usage.get("completion_tokens")?.as_u64()?,
    ))
}

/// Adds a field to the usage chunk, from the usage (the request's cost).
pub type Annotate = Box<dyn Fn(TokenUsage) -> (String, Value) + Send>;

/// Follows a server-sent-event stream of chat completion chunks.
pub struct SseMeter {
    pending: BytesMut,
    /// The stream's own usage report, when it came.
    pub usage: Option<TokenUsage>,
    /// Every choice's content so far (to count when no report comes).
    pub text: String,
    /// `data: [DONE]` came.
    pub done: bool,
    /// Drop the usage chunk (the client did not ask for it).
    strip_usage: bool,
    annotate: Option<Annotate>,
}

/// The end of the first event in `buffer`: its length and the separator's.
fn event_end(buffer: &[u8]) -> Option<(usize, usize)> {
    let lf = buffer.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2));
    let crlf = buffer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

impl SseMeter {
    pub fn new(strip_usage: bool, annotate: Option<Annotate>) -> SseMeter {
        SseMeter {
            pending: BytesMut::new(),
            usage: None,
            text: String::new(),
            done: false,
            strip_usage,
            annotate,
        }
    }

    /// Takes bytes from upstream; returns the complete events to pass on.
    pub fn feed(&mut self, chunk: &[u8]) -> Bytes {
        self.pending.extend_from_slice(chunk);
        let mut out = BytesMut::new();
        while let Some((length, separator)) = event_end(&self.pending) {
            let event = self.pending.split_to(length + separator);
            if let Some(kept) = self.event(&event[..length]) {
                out.extend_from_slice(&kept);
                out.extend_from_slice(b"\n\n");
            }
        }
        out.freeze()
    }

    /// What is left when the stream ends (an unterminated last event).
    pub fn finish(&mut self) -> Bytes {
        if self.pending.is_empty() {
            return Bytes::new();
        }
        let rest = self.pending.split();
        match self.event(&rest) {
            Some(kept) => {
                let mut out = BytesMut::from(&kept[..]);
                out.extend_from_slice(b"\n\n");
                out.freeze()
            }
            None => Bytes::new(),
        }
    }

    /// One event: noted, and passed on as is, changed, or dropped.
    fn event(&mut self, event: &[u8]) -> Option<Vec<u8>> {
        let text = std::str::from_utf8(event).ok()?;
        let data: String = text
            .lines()
            .filter_map(|line| line.strip_prefix("data:"))
            .map(|d| d.strip_prefix(' ').unwrap_or(d))
            .collect::<Vec<_>>()
            .join("\n");
        if data.is_empty() {
            return Some(event.to_vec());
        }
        if data.trim() == "[DONE]" {
            self.done = true;
            return Some(event.to_vec());
        }
        let Ok(mut chunk) = serde_json::from_str::<Value>(&data) else {
            return Some(event.to_vec());
        };
        if let Some(choices) = chunk.get("choices").and_then(Value::as_array) {
            for choice in choices {
                // Chat chunks carry `delta.content`; text completions `text`.
                let content = choice
                    .pointer("/delta/content")
                    .or_else(|| choice.get("text"));
                if let Some(content) = content.and_then(Value::as_str) {
                    self.text.push_str(content);
                }
                // Tool calls: their names and argument fragments are output too.
                let calls = choice
                    .pointer("/delta/tool_calls")
                    .and_then(Value::as_array);
                for call in calls.into_iter().flatten() {
                    for part in ["/function/name", "/function/arguments"] {
                        if let Some(text) = call.pointer(part).and_then(Value::as_str) {
                            self.text.push_str(text);
                        }
                    }
                }
            }
        }
        let Some(usage) = usage_of(&chunk) else {
            return Some(event.to_vec());
        };
        self.usage = Some(usage);
        let no_choices = chunk
            .get("choices")
            .and_then(Value::as_array)
            .is_none_or(Vec::is_empty);
        if self.strip_usage {
            if no_choices {
                return None;
            }
            if let Some(object) = chunk.as_object_mut() {
                object.remove("usage");
            }
        } else if let (Some(annotate), Some(object)) = (&self.annotate, chunk.as_object_mut()) {
            let (key, value) = annotate(usage);
            object.insert(key, value);
        } else {
            return Some(event.to_vec());
        }
        Some(format!("data: {chunk}").into_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &str = "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n\
        data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hello\"}}]}\n\n\
        : keep-alive\n\n\
        data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\" world\"},\"finish_reason\":\"stop\"}]}\n\n\
        data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":2,\"total_tokens\":9}}\n\n\
        data: [DONE]\n\n";

    #[test]
    fn usage_and_text_are_read_whatever_the_chunking() {
        for size in [1, 3, 17, STREAM.len()] {
            let mut meter = SseMeter::new(false, None);
            let mut out = Vec::new();
            for piece in STREAM.as_bytes().chunks(size) {
                out.extend_from_slice(&meter.feed(piece));
            }
            out.extend_from_slice(&meter.finish());
            assert_eq!(
                String::from_utf8(out).unwrap(),
                STREAM,
                "passed on unchanged"
            );
            assert_eq!(meter.usage, Some((7, 2)));
            assert_eq!(meter.text, "Hello world");
            assert!(meter.done);
        }
    }

    #[test]
    fn the_usage_chunk_is_dropped_when_not_asked_for_and_annotated_when_asked() {
        let mut meter = SseMeter::new(true, None);
        let out = String::from_utf8(meter.feed(STREAM.as_bytes()).to_vec()).unwrap();
        assert!(!out.contains("usage") && out.ends_with("data: [DONE]\n\n"));
        assert_eq!(meter.usage, Some((7, 2)));

        let annotate = Box::new(|(p, c): TokenUsage| ("cost".to_string(), Value::from(p + c)));
        let mut meter = SseMeter::new(false, Some(annotate));
        let out = String::from_utf8(meter.feed(STREAM.as_bytes()).to_vec()).unwrap();
        assert!(out.contains("\"cost\":9"), "{out}");
    }

    #[test]
    fn a_cut_stream_keeps_what_came() {
        let cut = &STREAM[..STREAM.find(" world").unwrap()];
        let mut meter = SseMeter::new(true, None);
        meter.feed(cut.as_bytes());
        meter.finish();
        assert_eq!(
            (meter.usage, meter.text.as_str(), meter.done),
            (None, "Hello", false)
        );
    }

    #[test]
    fn tool_call_deltas_count_as_output() {
        let stream = "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"id\":\"call_1\",\"type\":\"function\",\"function\":{\"name\":\"f\",\"arguments\":\"\"}}]}}]}\n\n\
            data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"{\\\"a\\\": 1}\"}}]}}]}\n\n";
        let mut meter = SseMeter::new(true, None);
        meter.feed(stream.as_bytes());
        assert_eq!(meter.text, "f{\"a\": 1}");
    }
}
