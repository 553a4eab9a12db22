//! Secrets: resolved only when an attempt starts, never written anywhere, and redacted
//! (with their base64 and URL-encoded forms) from everything that is.

use std::collections::BTreeSet;
use std::sync::Arc;

use base64::Engine as _;

use crate::error::{Error, ErrorKind, Result};
use crate::model::{SecretSource, SecurityRegistry};
use crate::traits::SecretValue;

/// Resolves a declared secret for an environment, from its env var, file or command.
/// The error names the secret and its source, never a value.
pub fn resolve(security: &SecurityRegistry, name: &str, environment: &str) -> Result<SecretValue> {
    let secret = security.secrets.get(name).ok_or_else(|| {
        Error::new(ErrorKind::NotFound, format!("secret `{name}` is not declared in security_registry.yaml"))
            .with_operation("secrets.resolve")
    })?;
    let source: SecretSource = secret.environments.get(environment).cloned().unwrap_or_else(|| secret.source());
    let fail = |kind: ErrorKind, message: String| {
        Error::new(kind, message).with_operation("secrets.resolve").with_context("secret", name)
    };
    if let Some(var) = &source.env {
        return std::env::var(var).map(SecretValue::new).map_err(|_| {
            fail(ErrorKind::NotFound, format!("secret `{name}` reads environment variable `{var}`, which is not set; export it before running nexus"))
        });
    }
    if let Some(path) = &source.file {
        return std::fs::read_to_string(path)
            .map(|text| SecretValue::new(text.trim_end_matches(['\n', '\r'])))
            .map_err(|e| fail(ErrorKind::NotFound, format!("secret `{name}` reads file `{path}`: {e}")));
    }
    if let Some(command) = &source.command {
        let output = std::process::Command::new("sh")
            .args(["-c", command])
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .output()
            .map_err(|e| fail(ErrorKind::Unavailable, format!("secret `{name}`: cannot run its command: {e}")))?;
        if !output.status.success() {
            return Err(fail(
                ErrorKind::Unavailable,
                format!("secret `{name}`: its command exited with {}", output.status),
            ));
        }
        let text = String::from_utf8_lossy(&output.stdout);
        return Ok(SecretValue::new(text.trim_end_matches(['\n', '\r'])));
    }
    Err(fail(ErrorKind::InvalidConfig, format!("secret `{name}` has no source for environment `{environment}`")))
}

/// Replaces secret values — as written, base64-encoded and URL-encoded — and the
/// configured patterns with a placeholder.
#[derive(Clone, Default)]
pub struct Redactor {
    inner: Arc<RedactorInner>,
}

#[derive(Default)]
struct RedactorInner {
    /// The secret values themselves.
    values: Vec<String>,
    /// Every form of every value, longest first, so a secret containing another is replaced whole.
    needles: Vec<String>,
    patterns: Vec<regex::Regex>,
    replacement: String,
}

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Redactor({} values, {} patterns)", self.inner.needles.len(), self.inner.patterns.len())
    }
}

/// Secrets shorter than this are not redacted: replacing every `a` or `1` in a log
/// would destroy it and protect nothing.
const MIN_SECRET_LEN: usize = 4;

impl Redactor {
    /// A redactor for these values and patterns (invalid patterns were refused by
    /// validation; they are skipped here).
    pub fn new<'a>(values: impl IntoIterator<Item = &'a str>, patterns: &[String], replacement: Option<&str>) -> Self {
        let mut needles = BTreeSet::new();
        let mut raw = Vec::new();
        for value in values {
            if value.len() < MIN_SECRET_LEN {
                continue;
            }
            raw.push(value.to_owned());
            needles.insert(value.to_owned());
            let b64 = base64::engine::general_purpose::STANDARD.encode(value);
            needles.insert(b64.trim_end_matches('=').to_owned());
            needles.insert(b64);
            needles.insert(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(value));
            let url = url_encode(value);
            if url != value {
                needles.insert(url);
            }
        }
        let mut needles: Vec<String> = needles.into_iter().collect();
        needles.sort_by_key(|n| std::cmp::Reverse(n.len()));
        let patterns = patterns.iter().filter_map(|p| regex::Regex::new(p).ok()).collect();
        Redactor {
            inner: Arc::new(RedactorInner {
                values: raw,
                needles,
                patterns,
                replacement: replacement.unwrap_or("***").to_owned(),
            }),
        }
    }

    /// A redactor with the values of `self` plus `more`.
    pub fn with_values<'a>(&self, more: impl IntoIterator<Item = &'a str>, patterns: &[String]) -> Self {
        let more: Vec<&str> = more.into_iter().collect();
        if more.iter().all(|m| self.inner.values.iter().any(|v| v == m)) {
            return self.clone();
        }
        let all = self.inner.values.iter().map(String::as_str).chain(more);
        Redactor::new(all, patterns, Some(&self.inner.replacement))
    }

    /// `text` with every secret form replaced.
    pub fn redact(&self, text: &str) -> String {
        let mut out = std::borrow::Cow::Borrowed(text);
        for needle in &self.inner.needles {
            if out.contains(needle.as_str()) {
                out = std::borrow::Cow::Owned(out.replace(needle.as_str(), &self.inner.replacement));
            }
        }
        for pattern in &self.inner.patterns {
            if pattern.is_match(&out) {
                out = std::borrow::Cow::Owned(pattern.replace_all(&out, self.inner.replacement.as_str()).into_owned());
            }
        }
        out.into_owned()
    }

    /// Whether there is nothing to redact.
    pub fn is_empty(&self) -> bool {
        self.inner.needles.is_empty() && self.inner.patterns.is_empty()
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn url_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_plain_base64_and_url_forms() {
        let r = Redactor::new(["s3cr3t/pass word"], &[], None);
        let b64 = base64::engine::general_purpose::STANDARD.encode("s3cr3t/pass word");
        let text = format!("a s3cr3t/pass word b {b64} c s3cr3t%2Fpass%20word d");
        assert_eq!(r.redact(&text), "a *** b *** c *** d");
    }

    #[test]
    fn redacts_patterns_and_ignores_tiny_values() {
        let r = Redactor::new(["ab"], &["AKIA[0-9A-Z]{16}".to_owned()], None);
        assert_eq!(r.redact("ab key AKIAABCDEFGHIJKLMNOP"), "ab key ***");
    }

    #[test]
    fn resolves_env_file_and_command_sources() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("s");
        std::fs::write(&file, "from-file\n").unwrap();
        let yaml = format!(
            "version: 1\nsecrets:\n  a: {{ env: NEXUS_TEST_SECRET_A }}\n  b: {{ file: {} }}\n  c: {{ command: 'echo from-command' }}\n",
            file.display()
        );
        let (value, _) = crate::yaml::parse(&yaml).unwrap();
        let security: SecurityRegistry = serde_json::from_value(value).unwrap();
        // SAFETY-free: set_var is safe in edition 2024 only with unsafe; use a var the
        // test environment provides instead.
        assert!(resolve(&security, "a", "dev").unwrap_err().message().contains("NEXUS_TEST_SECRET_A"));
        assert_eq!(resolve(&security, "b", "dev").unwrap().expose(), "from-file");
        assert_eq!(resolve(&security, "c", "dev").unwrap().expose(), "from-command");
        assert!(resolve(&security, "zz", "dev").is_err());
    }
}
