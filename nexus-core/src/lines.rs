//! Streams a pipe to a [`LogSink`] line by line, in bounded memory: the splitting every
//! runner that reads a byte stream (a local pipe, an SSH channel, a container's output
//! chunks, a pod's log) shares.

use crate::traits::{LogSink, Stream};
use tokio::io::{AsyncRead, AsyncReadExt};

/// The longest line passed to the log sink, in bytes; longer lines are split (at a
/// UTF-8 character boundary) into several.
pub const MAX_LINE_BYTES: usize = 64 * 1024;

/// Reads `reader` to its end, sending each line to `logs` as soon as it is complete.
/// Memory use stays within a few times [`MAX_LINE_BYTES`], whatever the output. A read
/// error ends the stream (the partial last line is still sent).
pub async fn pump<R: AsyncRead + Unpin>(reader: Option<R>, stream: Stream, logs: &dyn LogSink) {
    let Some(mut reader) = reader else { return };
    // Read into spare capacity: nothing is zeroed or touched before data arrives, so a
    // silent process costs no memory traffic (a zero-filled 64 KB buffer per stream did).
    let mut chunk: Vec<u8> = Vec::with_capacity(MAX_LINE_BYTES);
    let mut lines = LineBuffer::default();
    loop {
        chunk.clear();
        match reader.read_buf(&mut chunk).await {
            Ok(0) => break,
            Ok(_) => lines.push(&chunk, |line| logs.line(stream, line)),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    lines.finish(|line| logs.line(stream, line));
}

/// Turns chunks of a byte stream into lines, in bounded memory: the incomplete last line
/// is kept until the chunk that completes it. Lines lose their `\n` (or `\r\n`); lines
/// longer than the limit are cut, at a UTF-8 character boundary, into several.
#[derive(Debug)]
pub struct LineBuffer {
    pending: Vec<u8>,
    max: usize,
}

impl Default for LineBuffer {
    fn default() -> Self {
        LineBuffer::with_limit(MAX_LINE_BYTES)
    }
}

impl LineBuffer {
    /// A buffer cutting lines longer than `max` bytes.
    pub fn with_limit(max: usize) -> Self {
        LineBuffer { pending: Vec::new(), max: max.max(4) }
    }

    /// Calls `on_line` for every line `chunk` completes, keeping the rest for later.
    /// Memory stays within the limit plus one chunk.
    pub fn push(&mut self, mut chunk: &[u8], mut on_line: impl FnMut(&str)) {
        while let Some(end) = chunk.iter().position(|b| *b == b'\n') {
            self.pending.extend_from_slice(&chunk[..end]);
            self.cut_long(&mut on_line);
            if self.pending.last() == Some(&b'\r') {
                self.pending.pop();
            }
            on_line(&String::from_utf8_lossy(&self.pending));
            self.pending.clear();
            chunk = &chunk[end + 1..];
        }
        self.pending.extend_from_slice(chunk);
        self.cut_long(&mut on_line);
    }

    /// Sends the last, unterminated line, if any.
    pub fn finish(&mut self, mut on_line: impl FnMut(&str)) {
        if !self.pending.is_empty() {
            on_line(&String::from_utf8_lossy(&self.pending));
            self.pending.clear();
        }
    }

    /// Sends the first `max` bytes of the pending line as long as it is longer.
    fn cut_long(&mut self, on_line: &mut impl FnMut(&str)) {
        while self.pending.len() > self.max {
            let cut = char_boundary(&self.pending, self.max);
            on_line(&String::from_utf8_lossy(&self.pending[..cut]));
            self.pending.drain(..cut);
        }
    }
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

    async fn lines_of(input: &[u8]) -> Vec<String> {
        let sink = Collect::default();
        pump(Some(input), Stream::Stdout, &sink).await;
        sink.0.into_inner().unwrap()
    }

    #[tokio::test]
    async fn splits_on_newlines_and_keeps_a_last_unterminated_line() {
        assert_eq!(lines_of(b"a\r\n\nb\nc").await, ["a", "", "b", "c"]);
        assert!(lines_of(b"").await.is_empty());
    }

    fn lines_of_chunks(chunks: &[&[u8]]) -> Vec<String> {
        let mut out = Vec::new();
        let mut buffer = LineBuffer::default();
        for chunk in chunks {
            buffer.push(chunk, |l| out.push(l.to_owned()));
        }
        buffer.finish(|l| out.push(l.to_owned()));
        out
    }

    #[test]
    fn chunks_are_joined_split_into_lines_and_the_unterminated_last_kept() {
        assert_eq!(lines_of_chunks(&[b"a\r\n\nb", b"c\nd", b"", b"e"]), ["a", "", "bc", "de"]);
        assert_eq!(lines_of_chunks(&[b"x\n"]), ["x"]);
        assert!(lines_of_chunks(&[]).is_empty());
    }

    #[test]
    fn long_chunked_lines_are_cut_at_character_boundaries() {
        let long = "é".repeat(MAX_LINE_BYTES); // two bytes each
        let lines = lines_of_chunks(&[long.as_bytes(), b"\nafter"]);
        assert!(lines.iter().all(|l| l.len() <= MAX_LINE_BYTES && !l.contains('\u{fffd}')), "a character was cut");
        assert_eq!(lines.concat().len(), long.len() + "after".len());
        assert_eq!(lines.last().unwrap(), "after");
        assert_eq!(lines.len(), 3);
    }

    #[tokio::test]
    async fn long_lines_are_split_at_character_boundaries() {
        let mut input = vec![b'x'; MAX_LINE_BYTES - 1];
        input.extend_from_slice("é".as_bytes()); // straddles the limit
        input.extend_from_slice(b"tail\nnext\n");
        let lines = lines_of(&input).await;
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0].len(), MAX_LINE_BYTES - 1);
        assert_eq!(lines[1], "étail");
        assert_eq!(lines[2], "next");
    }
}
