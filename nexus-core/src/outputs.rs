//! The outputs file of an attempt (`$NEXUS_OUTPUT`): `key=value` lines, or
//! `key<<DELIM` … `DELIM` blocks for multi-line values (the format of GitHub Actions'
//! `$GITHUB_OUTPUT`). Every runner reads it the same way through these functions.

use std::io::Read;
use std::path::Path;

use crate::model::Map;

/// The most of the outputs file that is read, in bytes; the rest is ignored (with a
/// note in the attempt's log).
pub const MAX_OUTPUT_BYTES: u64 = 1024 * 1024;

/// Reads an outputs file on this machine. Returns the outputs (a later line wins over an
/// earlier one with the same key) and notes about lines that could not be understood.
/// A missing file means no outputs.
pub fn read_outputs_file(path: &Path) -> (Map<String>, Vec<String>) {
    let mut bytes = Vec::new();
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        // The attempt may have deleted the file (or never written it): no outputs.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (Map::new(), Vec::new()),
        Err(e) => return (Map::new(), vec![format!("cannot read $NEXUS_OUTPUT: {e}")]),
    };
    if let Err(e) = file.take(MAX_OUTPUT_BYTES + 1).read_to_end(&mut bytes) {
        return (Map::new(), vec![format!("cannot read $NEXUS_OUTPUT: {e}")]);
    }
    read_outputs_bytes(bytes)
}

/// Reads the content of an outputs file fetched by other means (at most
/// [`MAX_OUTPUT_BYTES`] + 1 bytes: more than the limit is cut at a whole line).
pub fn read_outputs_bytes(mut bytes: Vec<u8>) -> (Map<String>, Vec<String>) {
    let mut notes = Vec::new();
    if bytes.len() as u64 > MAX_OUTPUT_BYTES {
        bytes.truncate(MAX_OUTPUT_BYTES as usize);
        // Keep whole lines only.
        let end = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        bytes.truncate(end);
        notes.push(format!("$NEXUS_OUTPUT is larger than {MAX_OUTPUT_BYTES} bytes; the rest was ignored"));
    }
    let (outputs, more) = parse_outputs(&String::from_utf8_lossy(&bytes));
    notes.extend(more);
    (outputs, notes)
}

/// Parses the outputs format.
pub fn parse_outputs(text: &str) -> (Map<String>, Vec<String>) {
    let mut outputs = Map::new();
    let mut notes = Vec::new();
    let mut lines = text.lines().enumerate();
    while let Some((index, line)) = lines.next() {
        let number = index + 1;
        if line.trim().is_empty() {
            continue;
        }
        let heredoc = line.split_once("<<").filter(|(key, _)| !key.contains('='));
        if let Some((key, delimiter)) = heredoc {
            let (key, delimiter) = (key.trim(), delimiter.trim());
            if key.is_empty() || delimiter.is_empty() {
                notes.push(format!("$NEXUS_OUTPUT line {number}: expected `key<<DELIMITER`"));
                continue;
            }
            let mut value: Vec<&str> = Vec::new();
            let mut closed = false;
            for (_, line) in lines.by_ref() {
                if line == delimiter {
                    closed = true;
                    break;
                }
                value.push(line);
            }
            if !closed {
                notes.push(format!(
                    "$NEXUS_OUTPUT line {number}: `{key}` is never closed by a `{delimiter}` line; it was ignored"
                ));
                continue;
            }
            outputs.insert(key.to_owned(), value.join("\n"));
            continue;
        }
        match line.split_once('=') {
            Some((key, value)) if !key.trim().is_empty() => {
                outputs.insert(key.trim().to_owned(), value.to_owned());
            }
            _ => notes.push(format!("$NEXUS_OUTPUT line {number}: expected `key=value` or `key<<DELIMITER`")),
        }
    }
    (outputs, notes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pairs_heredocs_and_reports_bad_lines() {
        let text = "image=registry/app:1.2\nempty=\n\nurl=http://x/?a=b\nnotes<<EOF\nline 1\nline 2\nEOF\nno equals\nimage=registry/app:1.3\nopen<<END\nnever closed\n";
        let (outputs, notes) = parse_outputs(text);
        assert_eq!(outputs["image"], "registry/app:1.3");
        assert_eq!(outputs["empty"], "");
        assert_eq!(outputs["url"], "http://x/?a=b");
        assert_eq!(outputs["notes"], "line 1\nline 2");
        assert!(!outputs.contains_key("open"));
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert!(notes[0].starts_with("$NEXUS_OUTPUT line 9:"), "{notes:?}");
        assert!(notes[1].contains("never closed"), "{notes:?}");
    }

    #[test]
    fn too_large_a_file_keeps_whole_lines_within_the_limit() {
        let line = "k=".to_owned() + &"v".repeat(1000) + "\n";
        let mut bytes = line.repeat(2000).into_bytes();
        bytes.truncate(MAX_OUTPUT_BYTES as usize + 1);
        let (outputs, notes) = read_outputs_bytes(bytes);
        assert_eq!(outputs["k"].len(), 1000);
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(notes[0].contains("larger than"), "{notes:?}");
    }
}
