//! Streams a pipe to a [`LogSink`] line by line, in bounded memory: the splitting every
//! runner that reads a byte stream (a local pipe, an SSH channel) shares.

use crate::traits::{LogSink, Stream};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};

/// The longest line passed to the log sink, in bytes; longer lines are split (at a
/// UTF-8 character boundary) into several.
pub const MAX_LINE_BYTES: usize = 64 * 1024;

/// Reads `reader` to its end, sending each line to `logs` as soon as it is complete.
/// Memory use stays within a few times [`MAX_LINE_BYTES`], whatever the output.
pub async fn pump<R: AsyncRead + Unpin>(reader: Option<R>, stream: Stream, logs: &dyn LogSink) {
    let Some(reader) = reader else { return };
    let mut reader = BufReader::with_capacity(MAX_LINE_BYTES, reader);
    let mut line: Vec<u8> = Vec::new();
    loop {
        let buf = match reader.fill_buf().await {
            Ok(buf) => buf,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        if buf.is_empty() {
            break;
        }
        let (taken, complete) = match buf.iter().position(|b| *b == b'\n') {
            Some(end) => {
                line.extend_from_slice(&buf[..end]);
                (end + 1, true)
            }
            None => {
                line.extend_from_slice(buf);
                (buf.len(), false)
            }
        };
        reader.consume(taken);
        while line.len() > MAX_LINE_BYTES {
            let cut = char_boundary(&line, MAX_LINE_BYTES);
            emit(logs, stream, &line[..cut]);
            line.drain(..cut);
        }
        if complete {
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            emit(logs, stream, &line);
            line.clear();
        }
    }
    if !line.is_empty() {
        emit(logs, stream, &line);
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
