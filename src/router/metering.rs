//! Reading usage out of answers as they pass: the `usage` of a whole
//! answer, and for a stream of server-sent events (split into chunks by
//! `SseReader`) the usage chunk (asked for upstream with
//! `stream_options.include_usage`) plus the text streamed so far, counted
//! when a stream ends without a report.

use bytes::BytesMut;
use serde_json::Value;

/// Prompt and completion tokens.
pub type TokenUsage = (u64, u64);

/// The `usage` object of an answer or chunk (an embedding answer reports
/// prompt tokens only).
pub fn usage_of(value: &Value) -> Option<TokenUsage> {
    let usage = value.get("usage")?;
    let completion = match usage.get("completion_tokens") {
        Some(tokens) => tokens.as_u64()?,
        None => 0,
    };
    Some((usage.get("prompt_tokens")?.as_u64()?, completion))
}

/// One event's data from a server-sent-event stream.
#[derive(Debug, Clone, PartialEq)]
pub enum SseData {
    /// A chunk (JSON).
    Chunk(Value),
    /// `data: [DONE]`.
    Done,
    /// Data that is not JSON (passed over).
    Other(String),
}

/// Splits a byte stream of server-sent events into their data, whatever
/// the chunking.
#[derive(Default)]
pub struct SseReader {
    pending: BytesMut,
    /// How much of `pending` is known to hold no separator's start: each
    /// feed scans only what is new (rescanning from the start made an
    /// event sent in many small pieces cost quadratic time).
    scanned: usize,
}

/// The most an event may hold before the reader gives up on the stream:
/// far above any chunk an OpenAI-style server sends, and a bound on what an
/// upstream that never ends an event can make qpai hold.
pub const MAX_EVENT_BYTES: usize = 16 << 20;

/// An upstream event grew past [`MAX_EVENT_BYTES`].
#[derive(Debug, thiserror::Error)]
#[error("an upstream event grew past {MAX_EVENT_BYTES} bytes without ending")]
pub struct EventTooLarge;

/// The end of the first event in `buffer`, searching from `from`: its
/// length and the separator's.
fn event_end(buffer: &[u8], from: usize) -> Option<(usize, usize)> {
    let rest = &buffer[from.min(buffer.len())..];
    let lf = rest
        .windows(2)
        .position(|w| w == b"\n\n")
        .map(|i| (from + i, 2));
    let crlf = rest
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (from + i, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

/// An event's data lines, joined; None for an event without data (a
/// comment, a keep-alive).
fn event_data(event: &[u8]) -> Option<SseData> {
    let text = String::from_utf8_lossy(event);
    let data: String = text
        .lines()
        .filter_map(|line| line.strip_prefix("data:"))
        .map(|d| d.strip_prefix(' ').unwrap_or(d))
        .collect::<Vec<_>>()
        .join("\n");
    if data.is_empty() {
        return None;
    }
    if data.trim() == "[DONE]" {
        return Some(SseData::Done);
    }
    Some(match serde_json::from_str(&data) {
        Ok(chunk) => SseData::Chunk(chunk),
        Err(_) => SseData::Other(data),
    })
}

impl SseReader {
    /// Takes bytes; returns the data of the events they complete, or an
    /// error when an event outgrows [`MAX_EVENT_BYTES`].
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Vec<SseData>, EventTooLarge> {
        self.pending.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some((length, separator)) = event_end(&self.pending, self.scanned) {
            let event = self.pending.split_to(length + separator);
            self.scanned = 0;
            out.extend(event_data(&event[..length]));
        }
        // A separator may straddle this feed and the next.
        if self.pending.len() > MAX_EVENT_BYTES {
            self.pending = BytesMut::new();
            self.scanned = 0;
            return Err(EventTooLarge);
        }
        self.scanned = self.pending.len().saturating_sub(3);
        Ok(out)
    }

    /// The data of an unterminated last event, when the stream ends.
    pub fn finish(&mut self) -> Option<SseData> {
        let rest = self.pending.split();
        self.scanned = 0;
        event_data(&rest)
    }
}

/// What a stream of chunks has produced so far.
#[derive(Debug, Default)]
pub struct StreamMeter {
    /// The stream's own usage report, when it came.
    pub usage: Option<TokenUsage>,
    /// Every choice's output so far (to count when no report comes).
    pub text: String,
}

impl StreamMeter {
    /// Notes a chat or text completion chunk.
    pub fn observe(&mut self, chunk: &Value) {
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
        if let Some(usage) = usage_of(chunk) {
            self.usage = Some(usage);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &str = "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n\
        data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hello\"}}]}\n\n\
        : keep-alive\n\n\
        data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\" world\"},\"finish_reason\":\"stop\"}]}\r\n\r\n\
        data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":2,\"total_tokens\":9}}\n\n\
        data: [DONE]\n\n";

    fn read(stream: &str, size: usize) -> (Vec<SseData>, StreamMeter) {
        let mut reader = SseReader::default();
        let mut meter = StreamMeter::default();
        let mut events = Vec::new();
        for piece in stream.as_bytes().chunks(size) {
            events.extend(reader.feed(piece).unwrap());
        }
        events.extend(reader.finish());
        for event in &events {
            if let SseData::Chunk(chunk) = event {
                meter.observe(chunk);
            }
        }
        (events, meter)
    }

    #[test]
    fn usage_and_text_are_read_whatever_the_chunking() {
        for size in [1, 3, 17, STREAM.len()] {
            let (events, meter) = read(STREAM, size);
            assert_eq!(events.len(), 5, "a keep-alive has no data");
            assert_eq!(events.last(), Some(&SseData::Done));
            assert_eq!(meter.usage, Some((7, 2)));
            assert_eq!(meter.text, "Hello world");
        }
    }

    #[test]
    fn a_cut_stream_keeps_what_came() {
        let cut = &STREAM[..STREAM.find(" world").unwrap()];
        let (events, meter) = read(cut, 5);
        assert!(!events.contains(&SseData::Done));
        assert_eq!((meter.usage, meter.text.as_str()), (None, "Hello"));
    }

    #[test]
    fn tool_call_deltas_count_as_output() {
        let stream = "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"id\":\"call_1\",\"type\":\"function\",\"function\":{\"name\":\"f\",\"arguments\":\"\"}}]}}]}\n\n\
            data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"{\\\"a\\\": 1}\"}}]}}]}\n\n";
        assert_eq!(read(stream, 7).1.text, "f{\"a\": 1}");
    }

    #[test]
    fn embedding_usage_has_no_completion() {
        let answer = serde_json::json!({"usage": {"prompt_tokens": 5, "total_tokens": 5}});
        assert_eq!(usage_of(&answer), Some((5, 0)));
    }

    #[test]
    fn an_event_that_never_ends_is_refused_past_the_limit() {
        let mut reader = SseReader::default();
        let piece = vec![b'x'; 1 << 20];
        let mut fed = 0;
        let refused = loop {
            match reader.feed(&piece) {
                Ok(events) => assert!(events.is_empty()),
                Err(error) => break error,
            }
            fed += piece.len();
            assert!(fed <= MAX_EVENT_BYTES, "{fed} bytes held");
        };
        assert!(refused.to_string().contains("without ending"));
        // The reader starts over: a whole event still reads.
        let events = reader.feed(b"data: [DONE]\n\n").unwrap();
        assert!(matches!(events[..], [SseData::Done]));
    }
}
