//! Attempt logs: one file per attempt, written line by line (redacted), plus the last
//! line of each running step for progress displays.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::Result;
use crate::secrets::Redactor;
use crate::traits::{LogSink, Stream, TargetReport};

/// The last log line of each running step.
#[derive(Clone, Default)]
pub struct LiveStatus {
    last: Arc<Mutex<HashMap<String, String>>>,
}

impl LiveStatus {
    /// The last line written by `step`, if any.
    pub fn last_line(&self, step: &str) -> Option<String> {
        self.last.lock().ok()?.get(step).cloned()
    }

    fn set(&self, step: &str, line: &str) {
        if let Ok(mut map) = self.last.lock() {
            match map.get_mut(step) {
                Some(existing) => {
                    existing.clear();
                    existing.push_str(line);
                }
                None => {
                    map.insert(step.to_owned(), line.to_owned());
                }
            }
        }
    }
}

/// Writes an attempt's lines to its log file as `<unix-ms> <out|err> <line>`. The file
/// is created with the first line: a silent attempt costs no file. Each line is written
/// as it comes, unbuffered, so `nexus logs --follow` shows a running step's lines at
/// once and the log of a process that was killed holds every line it was given.
pub struct FileSink {
    path: std::path::PathBuf,
    file: Mutex<Option<File>>,
    redactor: Redactor,
    live: LiveStatus,
    step: String,
    /// How each target (host of a group) ended, as the runner reported.
    targets: Mutex<Vec<TargetReport>>,
}

impl FileSink {
    /// A sink for the log file at `path` (its directory must exist).
    pub fn create(path: &Path, redactor: Redactor, live: LiveStatus, step: String) -> Result<Self> {
        Ok(FileSink { path: path.to_owned(), file: Mutex::new(None), redactor, live, step, targets: Mutex::default() })
    }

    /// The reports of the attempt's targets, in the order they ended.
    pub fn take_targets(&self) -> Vec<TargetReport> {
        self.targets.lock().map(|mut t| std::mem::take(&mut *t)).unwrap_or_default()
    }
}

impl LogSink for FileSink {
    fn line(&self, stream: Stream, line: &str) {
        let line = if self.redactor.is_empty() { line.to_owned() } else { self.redactor.redact(line) };
        let ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis());
        let tag = match stream {
            Stream::Stdout => "out",
            Stream::Stderr => "err",
        };
        if let Ok(mut f) = self.file.lock() {
            if f.is_none() {
                // A log that cannot be created must not kill the step.
                *f = File::create(&self.path).ok();
            }
            if let Some(f) = f.as_mut() {
                // One write per line. A full disk must not kill the step either; the
                // log stops growing.
                let _ = f.write_all(format!("{ms} {tag} {line}\n").as_bytes());
            }
        }
        self.live.set(&self.step, &line);
    }

    /// Each target's lines go to its own file (`<attempt>.<target>.log`) and, prefixed
    /// `[target] `, to the attempt's log.
    fn target<'a>(&'a self, name: &str) -> Box<dyn LogSink + 'a> {
        let own = FileSink {
            path: target_log_path(&self.path, name),
            file: Mutex::new(None),
            redactor: self.redactor.clone(),
            live: LiveStatus::default(),
            step: String::new(),
            targets: Mutex::default(),
        };
        Box::new(TargetSink { attempt: self, own, prefix: format!("[{name}] ") })
    }

    fn target_finished(&self, report: &TargetReport) {
        if let Ok(mut t) = self.targets.lock() {
            t.push(report.clone());
        }
    }
}

/// The log of one target of an attempt.
struct TargetSink<'a> {
    attempt: &'a FileSink,
    own: FileSink,
    prefix: String,
}

impl LogSink for TargetSink<'_> {
    fn line(&self, stream: Stream, line: &str) {
        self.own.line(stream, line);
        self.attempt.line(stream, &format!("{}{line}", self.prefix));
    }

    fn target_finished(&self, report: &TargetReport) {
        self.attempt.target_finished(report);
    }
}

/// `logs/r/deploy.1.log` and `web-1` give `logs/r/deploy.1.web-1.log` (the name made
/// safe for a file name).
pub fn target_log_path(attempt_log: &Path, target: &str) -> std::path::PathBuf {
    let text = attempt_log.to_string_lossy();
    let stem = text.strip_suffix(".log").unwrap_or(&text);
    std::path::PathBuf::from(format!("{stem}.{}.log", super::sanitize(target)))
}

/// One parsed log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// Unix milliseconds.
    pub at_ms: i64,
    /// `out` or `err`.
    pub stream: String,
    /// The text.
    pub text: String,
}

/// Parses a line of a log file.
pub fn parse_line(raw: &str) -> Option<LogLine> {
    let (ms, rest) = raw.split_once(' ')?;
    let (stream, text) = rest.split_once(' ').unwrap_or((rest, ""));
    Some(LogLine { at_ms: ms.parse().ok()?, stream: stream.to_owned(), text: text.to_owned() })
}
