//! Turns the chunks of a container's output into lines, in bounded memory.

use nexus_core::traits::{LogSink, Stream};

/// The longest line passed to the log sink, in bytes; longer lines are split (at a
/// UTF-8 character boundary) into several. The same limit as the local runner's.
pub const MAX_LINE_BYTES: usize = 64 * 1024;

/// The incomplete last line of one stream.
#[derive(Default)]
pub(crate) struct LineBuffer {
    pending: Vec<u8>,
}

impl LineBuffer {
    /// Sends every line completed by `chunk` to `logs`, keeping the rest for later.
    /// Memory stays within [`MAX_LINE_BYTES`] plus one chunk.
    pub(crate) fn push(&mut self, mut chunk: &[u8], stream: Stream, logs: &dyn LogSink) {
        while let Some(end) = chunk.iter().position(|b| *b == b'\n') {
            self.pending.extend_from_slice(&chunk[..end]);
            self.split_long(stream, logs);
            if self.pending.last() == Some(&b'\r') {
                self.pending.pop();
            }
            emit(logs, stream, &self.pending);
            self.pending.clear();
            chunk = &chunk[end + 1..];
        }
        self.pending.extend_from_slice(chunk);
        self.split_long(stream, logs);
    }

    /// Sends the last, unterminated line, if any.
    pub(crate) fn finish(&mut self, stream: Stream, logs: &dyn LogSink) {
        if !self.pending.is_empty() {
            emit(logs, stream, &self.pending);
            self.pending.clear();
        }
    }

    /// Sends the first [`MAX_LINE_BYTES`] of the pending line as long as it is longer.
    fn split_long(&mut self, stream: Stream, logs: &dyn LogSink) {
        while self.pending.len() > MAX_LINE_BYTES {
            let cut = char_boundary(&self.pending, MAX_LINE_BYTES);
            emit(logs, stream, &self.pending[..cut]);
            self.pending.drain(..cut);
        }
    }
}

fn emit(logs: &dyn LogSink, stream: Stream, bytes: &[u8]) {
    logs.line(stream, &String::from_utf8_lossy(bytes));
}

/// The largest cut point `<= max` that does not split a UTF-8 character (or `max` when
/// the bytes are not UTF-8 there). `bytes.len()` must be greater than `max`.
fn char_boundary(bytes: &[u8], max: usize) -> usize {
    let is_continuation = |b: u8| b & 0xC0 == 0x80;
    (max.saturating_sub(3)..=max).rev().find(|&cut| cut > 0 && !is_continuation(bytes[cut])).unwrap_or(max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Collect(Mutex<Vec<String>>);

    impl LogSink for Collect {
        fn line(&self, _: Stream, line: &str) {
            self.0.lock().unwrap().push(line.to_owned());
        }
    }

    fn lines_of(chunks: &[&[u8]]) -> Vec<String> {
        let sink = Collect::default();
        let mut buffer = LineBuffer::default();
        for chunk in chunks {
            buffer.push(chunk, Stream::Stdout, &sink);
        }
        buffer.finish(Stream::Stdout, &sink);
        sink.0.into_inner().unwrap()
    }

    #[test]
    fn joins_chunks_splits_lines_and_keeps_the_unterminated_last() {
        assert_eq!(lines_of(&[b"a\r\n\nb", b"c\nd", b"", b"e"]), ["a", "", "bc", "de"]);
        assert_eq!(lines_of(&[b"x\n"]), ["x"]);
        assert!(lines_of(&[]).is_empty());
    }

    #[test]
    fn long_lines_are_split_at_character_boundaries() {
        let long = "é".repeat(MAX_LINE_BYTES); // two bytes each
        let lines = lines_of(&[long.as_bytes(), b"\nafter"]);
        assert!(lines.iter().all(|l| l.len() <= MAX_LINE_BYTES && !l.contains('\u{fffd}')), "a character was cut");
        assert_eq!(lines.concat().len(), long.len() + "after".len());
        assert_eq!(lines.last().unwrap(), "after");
        assert_eq!(lines.len(), 3);
    }
}
