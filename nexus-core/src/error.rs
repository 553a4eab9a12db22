//! The one error type of Nexus (DESIGN.md §3), shaped after OpenDAL's: a kind, whether
//! retrying may help, the operation, key–value context and a source.
//!
//! Secrets never go into an error: callers put names in the context, never values.

use std::fmt;

/// Declares [`ErrorKind`] with each variant's stable name, so that the enum, `as_str`
/// and the list `from_name` searches cannot disagree.
macro_rules! error_kinds {
    ($($(#[doc = $doc:literal])* $variant:ident => $name:literal,)+) => {
        /// What went wrong, as a caller needs to know it to decide what to do.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum ErrorKind {
            $($(#[doc = $doc])* $variant,)+
        }

        impl ErrorKind {
            /// Every kind.
            const ALL: &'static [ErrorKind] = &[$(ErrorKind::$variant),+];

            /// Short stable name, used in JSON output and across the plugin boundary.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(ErrorKind::$variant => $name,)+
                }
            }
        }
    };
}

error_kinds! {
    /// The configuration is wrong; fix it and try again.
    InvalidConfig => "invalid_config",
    /// Something named does not exist (a run, a step, a file, a remote object).
    NotFound => "not_found",
    /// Credentials are missing or refused.
    PermissionDenied => "permission_denied",
    /// An operation took longer than allowed.
    Timeout => "timeout",
    /// A service or daemon cannot be reached or is overloaded.
    Unavailable => "unavailable",
    /// The component does not support this operation.
    Unsupported => "unsupported",
    /// The operation was cancelled.
    Cancelled => "cancelled",
    /// The operation conflicts with the current state (a lock held, a run finished).
    Conflict => "conflict",
    /// A bug or an unexpected state inside Nexus or a component.
    Internal => "internal",
}

impl ErrorKind {
    /// The kind named `name` by [`as_str`](Self::as_str), if any.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|kind| kind.as_str() == name)
    }

    /// Whether errors of this kind are usually temporary.
    pub fn default_retryable(self) -> bool {
        matches!(self, ErrorKind::Timeout | ErrorKind::Unavailable)
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error of every fallible operation in Nexus.
pub struct Error {
    kind: ErrorKind,
    message: String,
    retryable: bool,
    operation: &'static str,
    context: Vec<(&'static str, String)>,
    retry_after: Option<std::time::Duration>,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new error; `message` says what went wrong and, where possible, what to do.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            retryable: kind.default_retryable(),
            operation: "",
            context: Vec::new(),
            retry_after: None,
            source: None,
        }
    }

    /// The same error (kind, retryability, context, source) with another message.
    pub fn with_message(mut self, message: impl Into<String>) -> Self {
        self.message = message.into();
        self
    }

    /// Names the operation that failed (`load`, `runner.run`, `notify.send`…).
    pub fn with_operation(mut self, operation: &'static str) -> Self {
        self.operation = operation;
        self
    }

    /// Adds a key–value pair of context (a name, a path, a host; never a secret).
    pub fn with_context(mut self, key: &'static str, value: impl fmt::Display) -> Self {
        self.context.push((key, value.to_string()));
        self
    }

    /// Attaches the underlying error.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// Overrides whether retrying may help.
    pub fn set_retryable(mut self, retryable: bool) -> Self {
        self.retryable = retryable;
        self
    }

    /// Says how long the other side asked to wait before trying again (an HTTP
    /// `Retry-After`); implies the error is retryable.
    pub fn with_retry_after(mut self, wait: std::time::Duration) -> Self {
        self.retry_after = Some(wait);
        self.retryable = true;
        self
    }

    /// How long the other side asked to wait before a retry, if it said.
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        self.retry_after
    }

    /// What went wrong.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// Whether retrying the operation may succeed.
    pub fn is_retryable(&self) -> bool {
        self.retryable
    }

    /// The operation that failed, if named.
    pub fn operation(&self) -> &'static str {
        self.operation
    }

    /// The message, without context.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The key–value context.
    pub fn context(&self) -> &[(&'static str, String)] {
        &self.context
    }
}

impl fmt::Display for Error {
    /// One line: `kind (operation, key: value, …): message: source`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.kind)?;
        let mut extra = Vec::new();
        if !self.operation.is_empty() {
            extra.push(format!("operation: {}", self.operation));
        }
        extra.extend(self.context.iter().map(|(k, v)| format!("{k}: {v}")));
        if !extra.is_empty() {
            write!(f, " ({})", extra.join(", "))?;
        }
        write!(f, ": {}", self.message)?;
        if let Some(source) = &self.source {
            write!(f, ": {source}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Error {
    /// Several lines, for logs and `{:?}` in tests.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} => {}", self.kind, self.message)?;
        if !self.operation.is_empty() {
            writeln!(f, "    operation: {}", self.operation)?;
        }
        writeln!(f, "    retryable: {}", self.retryable)?;
        for (k, v) in &self.context {
            writeln!(f, "    {k}: {v}")?;
        }
        if let Some(source) = &self.source {
            writeln!(f, "    source: {source:?}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|e| e as _)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_is_one_line_with_context() {
        let err = Error::new(ErrorKind::NotFound, "no such run").with_operation("show").with_context("run", "r-42");
        assert_eq!(err.to_string(), "not_found (operation: show, run: r-42): no such run");
        assert!(!err.is_retryable());
        assert!(Error::new(ErrorKind::Unavailable, "down").is_retryable());
    }

    #[test]
    fn every_kind_is_found_by_its_name() {
        // Each name leads back to its own kind: no two kinds share a name.
        for &kind in ErrorKind::ALL {
            assert_eq!(ErrorKind::from_name(kind.as_str()), Some(kind));
        }
        assert_eq!(ErrorKind::from_name("nope"), None);
    }
}
