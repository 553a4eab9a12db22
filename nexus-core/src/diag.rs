//! Diagnostics: what `nexus validate` reports, compiler-style.
//!
//! A diagnostic names the file, line and column, carries the source line it points
//! at, says what was expected and, where one exists, suggests a fix. Rendering on a
//! terminal (colors, miette) belongs to the CLI; [`Diagnostic::render_plain`] is the
//! uncoloured form used for pipes, logs and tests.

use std::fmt::{self, Write as _};
use std::path::PathBuf;

use serde::Serialize;

/// How bad a diagnostic is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// Suspicious but valid.
    Warning,
    /// The configuration is invalid.
    Error,
}

/// Where a diagnostic points.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Location {
    /// The file.
    pub file: PathBuf,
    /// Line, from 1.
    pub line: u32,
    /// Column, from 1, in characters.
    pub column: u32,
    /// Byte offset of the start in the file.
    pub offset: usize,
    /// Length in bytes of the range pointed at (at least 1 where the file is not empty).
    pub length: usize,
    /// The whole source line, for the snippet.
    pub snippet: String,
}

/// One problem found in the configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    /// Error or warning.
    pub level: Level,
    /// Stable identifier (`nexus::unknown_field`), documented in docs/registries.md.
    pub code: &'static str,
    /// What is wrong.
    pub message: String,
    /// Where, when the problem is in a file.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub location: Option<Location>,
    /// What was expected there (shown under the snippet).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expected: Option<String>,
    /// How to fix it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub help: Option<String>,
}

impl Diagnostic {
    /// An error without a location yet.
    pub fn error(code: &'static str, message: impl Into<String>) -> Self {
        Diagnostic { level: Level::Error, code, message: message.into(), location: None, expected: None, help: None }
    }

    /// A warning without a location yet.
    pub fn warning(code: &'static str, message: impl Into<String>) -> Self {
        Diagnostic { level: Level::Warning, ..Diagnostic::error(code, message) }
    }

    /// Sets the location.
    pub fn at(mut self, location: Option<Location>) -> Self {
        self.location = location;
        self
    }

    /// Says what was expected.
    pub fn expected(mut self, expected: impl Into<String>) -> Self {
        self.expected = Some(expected.into());
        self
    }

    /// Suggests a fix.
    pub fn help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }

    /// Suggests a fix unless one is already given (such as a "did you mean").
    pub fn help_or(self, help: impl Into<String>) -> Self {
        if self.help.is_some() { self } else { self.help(help) }
    }

    /// Adds `did you mean `x`?` when a near candidate exists.
    pub fn suggest<'a>(self, word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Self {
        match crate::suggest::closest(word, candidates) {
            Some(near) => self.help(format!("did you mean `{near}`?")),
            None => self,
        }
    }

    /// Renders the diagnostic without colours:
    ///
    /// ```text
    /// error[nexus::unknown_automation]: unknown automation `biuld-api`
    ///   --> config/ssot/pipeline_registry.yaml:12:15
    ///    |
    /// 12 |         uses: biuld-api
    ///    |               ^^^^^^^^^ expected the name of an automation
    ///    = help: did you mean `build-api`?
    /// ```
    pub fn render_plain(&self) -> String {
        let mut out = String::new();
        let level = match self.level {
            Level::Error => "error",
            Level::Warning => "warning",
        };
        let _ = writeln!(out, "{level}[{}]: {}", self.code, self.message);
        if let Some(loc) = &self.location {
            let number = loc.line.to_string();
            let pad = " ".repeat(number.len());
            let _ = writeln!(out, "{pad}--> {}:{}:{}", loc.file.display(), loc.line, loc.column);
            let _ = writeln!(out, "{pad} |");
            let _ = writeln!(out, "{number} | {}", loc.snippet);
            let before: String = loc.snippet.chars().take(loc.column.saturating_sub(1) as usize).collect();
            let indent: String = before.chars().map(|c| if c == '\t' { '\t' } else { ' ' }).collect();
            let rest = loc.snippet.chars().count().saturating_sub(before.chars().count());
            let width = loc.snippet[before.len().min(loc.snippet.len())..]
                .char_indices()
                .take_while(|(i, _)| *i < loc.length)
                .count()
                .clamp(1, rest.max(1));
            let _ = write!(out, "{pad} | {indent}{}", "^".repeat(width));
            if let Some(expected) = &self.expected {
                let _ = write!(out, " expected {expected}");
            }
            out.push('\n');
        } else if let Some(expected) = &self.expected {
            let _ = writeln!(out, "  = expected: {expected}");
        }
        if let Some(help) = &self.help {
            let pad = self.location.as_ref().map_or(1, |l| l.line.to_string().len());
            let _ = writeln!(out, "{} = help: {help}", " ".repeat(pad));
        }
        out
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(loc) = &self.location {
            write!(f, "{}:{}:{}: ", loc.file.display(), loc.line, loc.column)?;
        }
        write!(f, "{} [{}]", self.message, self.code)
    }
}

/// Every diagnostic of one validation, in file and line order.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// The diagnostics.
    pub diagnostics: Vec<Diagnostic>,
}

impl Report {
    /// Adds a diagnostic.
    pub fn push(&mut self, diagnostic: Diagnostic) {
        self.diagnostics.push(diagnostic);
    }

    /// Number of errors.
    pub fn error_count(&self) -> usize {
        self.diagnostics.iter().filter(|d| d.level == Level::Error).count()
    }

    /// Whether there is at least one error.
    pub fn has_errors(&self) -> bool {
        self.error_count() > 0
    }

    /// Sorts by file, line and column; removes exact duplicates.
    pub fn sort(&mut self) {
        self.diagnostics.sort_by(|a, b| {
            let key = |d: &Diagnostic| d.location.as_ref().map(|l| (l.file.clone(), l.line, l.column));
            key(a).cmp(&key(b)).then_with(|| a.message.cmp(&b.message))
        });
        self.diagnostics.dedup();
    }
}
