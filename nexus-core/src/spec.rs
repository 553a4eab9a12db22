//! Helpers for the pure `validate` of component specs: the checks every kind needs,
//! written once, and a `Debug` helper that hides values.
//!
//! Each `check_*` function pushes at most one [`SpecIssue`] at `path` onto `issues` and
//! returns whether `value` passed, so a kind can chain a further check on a value that
//! is well-formed (`if check_url(…) { /* look at the path */ }`). Templates
//! ([`is_template`]) are only known once rendered, so format checks skip them; checks
//! that must hold for any rendering (no credentials in a URL, a secret given by
//! reference) still apply. No message repeats a value that may be a secret.

use std::fmt;

use crate::catalog::SpecIssue;
use crate::model::{Duration, Map};

/// Whether a spec value is a template (`{{ … }}`), rendered only when the component is
/// built; format checks do not apply to it.
pub fn is_template(value: &str) -> bool {
    value.contains("{{") || value.contains("{%")
}

/// Checks that `value` is an absolute URL with one of `schemes` (in the order given,
/// without `://`), a host, no spaces, and no credentials (`user:password@`), which
/// would show in logs. `credentials_hint` says where the kind takes credentials instead
/// (``"send them in `headers`"``), when it takes any.
///
/// A template is checked for credentials only.
pub fn check_url(
    issues: &mut Vec<SpecIssue>,
    path: &[&str],
    value: &str,
    schemes: &[&str],
    credentials_hint: Option<&str>,
) -> bool {
    let rest = value.split_once("://").map_or(value, |(_, rest)| rest);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.contains('@') {
        let mut message = "the URL must not carry credentials (`user:password@`), which would show in logs".to_owned();
        if let Some(hint) = credentials_hint {
            message.push_str("; ");
            message.push_str(hint);
        }
        issues.push(SpecIssue::new(path, message));
        return false;
    }
    if is_template(value) {
        return true;
    }
    match value.split_once("://") {
        Some((scheme, _)) if schemes.contains(&scheme) => {}
        _ => {
            let expected = schemes.iter().map(|s| format!("`{s}://`")).collect::<Vec<_>>().join(" or ");
            issues.push(SpecIssue::new(path, format!("`{value}` is not a URL starting with {expected}")));
            return false;
        }
    }
    if authority.is_empty() || value.contains(char::is_whitespace) {
        issues.push(SpecIssue::new(path, format!("`{value}` must name a host and contain no spaces")));
        return false;
    }
    true
}

/// Checks that a credential is a `{{ secrets.* }}` reference, never a literal that would
/// sit in the file in clear. `example_name` is the secret the message suggests
/// (`db_password` gives `{{ secrets.db_password }}`). The message never repeats the value.
pub fn check_secret_ref(issues: &mut Vec<SpecIssue>, path: &[&str], value: &str, example_name: &str) -> bool {
    if is_template(value) && value.contains("secrets.") {
        return true;
    }
    issues.push(SpecIssue::new(
        path,
        format!(
            "write the credential as a reference such as `{{{{ secrets.{example_name} }}}}` and declare it in \
             security_registry.yaml; a literal value would sit in the file in clear"
        ),
    ));
    false
}

/// Whether `name` is an HTTP token (RFC 9110 §5.6.2), as header names must be.
pub fn is_header_name(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c))
}

/// Checks that `name` is a valid HTTP header name ([`is_header_name`]).
pub fn check_header_name(issues: &mut Vec<SpecIssue>, path: &[&str], name: &str) -> bool {
    if is_header_name(name) {
        return true;
    }
    issues.push(SpecIssue::new(
        path,
        format!("`{name}` is not a valid header name: use letters, digits and `-`, without spaces or `:`"),
    ));
    false
}

/// Checks that `value` holds no line break, which would let it smuggle another header
/// or field into a request or message. `what` names the value in the message
/// (`a header value` gives "a header value must be a single line").
pub fn check_single_line(issues: &mut Vec<SpecIssue>, path: &[&str], value: &str, what: &str) -> bool {
    if !value.contains(['\r', '\n']) {
        return true;
    }
    issues.push(SpecIssue::new(path, format!("{what} must be a single line")));
    false
}

/// Checks the HTTP headers of the map at `field`: every name is a header name
/// ([`check_header_name`]) and every value a single line ([`check_single_line`]), each
/// reported at `[field, name]`. Values may be templates and are never quoted.
pub fn check_headers(issues: &mut Vec<SpecIssue>, field: &str, headers: &Map<String>) -> bool {
    let mut passed = true;
    for (name, value) in headers {
        passed &= check_header_name(issues, &[field, name], name);
        passed &= check_single_line(issues, &[field, name], value, "a header value");
    }
    passed
}

/// Checks that `name` can name an environment variable: not empty, without `=` or NUL.
/// A template is not checked.
pub fn check_env_name(issues: &mut Vec<SpecIssue>, path: &[&str], name: &str) -> bool {
    if is_template(name) {
        return true;
    }
    if name.is_empty() {
        issues.push(SpecIssue::new(path, "an environment variable's name cannot be empty"));
        return false;
    }
    if name.contains(['=', '\0']) {
        issues.push(SpecIssue::new(
            path,
            format!("`{name}` is not a valid environment variable name: it cannot contain `=` or NUL"),
        ));
        return false;
    }
    true
}

/// Checks that a duration, when given, is longer than zero. `what` names it in the
/// message (`timeout` gives "the timeout must be longer than zero").
pub fn check_positive_duration(
    issues: &mut Vec<SpecIssue>,
    path: &[&str],
    value: Option<Duration>,
    what: &str,
) -> bool {
    if !value.is_some_and(|d| d.get().is_zero()) {
        return true;
    }
    issues.push(SpecIssue::new(path, format!("the {what} must be longer than zero")));
    false
}

/// Checks that a list has at least one item. `what` names one item in the message
/// (`recipient` gives "give at least one recipient").
pub fn check_non_empty<T>(issues: &mut Vec<SpecIssue>, path: &[&str], items: &[T], what: &str) -> bool {
    if !items.is_empty() {
        return true;
    }
    issues.push(SpecIssue::new(path, format!("give at least one {what}")));
    false
}

/// Checks that a text is not empty or only spaces. `what` names it and `fix` says what to
/// do (`shell`, ``"name one such as `sh`"`` give "the shell is empty; name one such as
/// `sh`").
pub fn check_not_blank(issues: &mut Vec<SpecIssue>, path: &[&str], value: &str, what: &str, fix: &str) -> bool {
    if !value.trim().is_empty() {
        return true;
    }
    issues.push(SpecIssue::new(path, format!("the {what} is empty; {fix}")));
    false
}

/// Checks that two optional top-level fields, each given as `(name, is given)`, are given
/// together or not at all; the issue is reported at the missing one. `when_neither` says what
/// leaving both out means (`to use the AWS credential chain`).
pub fn check_together(
    issues: &mut Vec<SpecIssue>,
    first: (&str, bool),
    second: (&str, bool),
    when_neither: &str,
) -> bool {
    let (given, missing) = match (first, second) {
        ((given, true), (missing, false)) | ((missing, false), (given, true)) => (given, missing),
        _ => return true,
    };
    issues
        .push(SpecIssue::new(&[missing], format!("`{given}` needs `{missing}`; give both, or neither {when_neither}")));
    false
}

/// Shows a map's keys with every value as `***`, for the `Debug` of a spec whose map
/// values may hold credentials (HTTP headers): `{"Authorization": "***"}`.
pub struct MaskedValues<'a, V>(pub &'a Map<V>);

impl<V> fmt::Debug for MaskedValues<'_, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.0.keys().map(|key| (key, "***"))).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The issues `check` pushes, as `path: message`, and whether it said it passed.
    fn run(check: impl FnOnce(&mut Vec<SpecIssue>) -> bool) -> (bool, Vec<String>) {
        let mut issues = Vec::new();
        let passed = check(&mut issues);
        let shown: Vec<String> = issues.iter().map(|i| format!("{}: {}", i.path.join("."), i.message)).collect();
        assert_eq!(passed, shown.is_empty(), "a check passes exactly when it reports nothing: {shown:#?}");
        (passed, shown)
    }

    /// Asserts that `check` reports exactly one issue, containing `needle`.
    fn refused(check: impl FnOnce(&mut Vec<SpecIssue>) -> bool, needle: &str) -> String {
        let (_, shown) = run(check);
        assert_eq!(shown.len(), 1, "{shown:#?}");
        assert!(shown[0].contains(needle), "`{needle}` not in {shown:#?}");
        shown.into_iter().next().unwrap_or_default()
    }

    fn passed(check: impl FnOnce(&mut Vec<SpecIssue>) -> bool) {
        let (passed, shown) = run(check);
        assert!(passed, "{shown:#?}");
    }

    #[test]
    fn templates_are_expressions_or_statements() {
        assert!(is_template("https://{{ env.vars.host }}/"));
        assert!(is_template("{% if prod %}a{% endif %}"));
        assert!(!is_template("https://example.com/{ok}"));
    }

    #[test]
    fn urls_need_a_listed_scheme_and_a_host() {
        let http = ["http", "https"];
        passed(|i| check_url(i, &["url"], "https://example.com/healthz?x=1", &http, None));
        passed(|i| check_url(i, &["url"], "http://{{ env.vars.host }}:8080", &http, None));
        let message = refused(|i| check_url(i, &["url"], "ftp://example.com/", &http, None), "not a URL");
        assert_eq!(message, "url: `ftp://example.com/` is not a URL starting with `http://` or `https://`");
        refused(|i| check_url(i, &["url"], "example.com", &["https", "http"], None), "`https://` or `http://`");
        refused(|i| check_url(i, &["url"], "https:///healthz", &http, None), "must name a host");
        refused(|i| check_url(i, &["url"], "https://exa mple.com/", &http, None), "no spaces");
    }

    #[test]
    fn urls_never_carry_credentials_even_in_a_template() {
        let http = ["http", "https"];
        let message = refused(
            |i| check_url(i, &["url"], "https://me:{{ secrets.pw }}@example.com/", &http, Some("use `password`")),
            "credentials",
        );
        assert!(message.ends_with("which would show in logs; use `password`"), "{message}");
        let message = refused(|i| check_url(i, &["url"], "http://u:p@example.com", &http, None), "credentials");
        assert!(message.ends_with("which would show in logs"), "{message}");
        assert!(!message.contains("u:p"), "{message}");
        passed(|i| check_url(i, &["url"], "https://example.com/users/@me", &http, None));
    }

    #[test]
    fn secrets_are_references_and_never_repeated() {
        passed(|i| check_secret_ref(i, &["password"], "{{ secrets.db_password }}", "db_password"));
        let message = refused(|i| check_secret_ref(i, &["password"], "hunter2", "db_password"), "in clear");
        assert!(message.contains("such as `{{ secrets.db_password }}`"), "{message}");
        assert!(!message.contains("hunter2"), "{message}");
        refused(|i| check_secret_ref(i, &["password"], "{{ env.vars.db_password }}", "db_password"), "in clear");
    }

    #[test]
    fn header_names_are_http_tokens() {
        assert!(is_header_name("X-Nexus-Signature-256"));
        for bad in ["", "Bad Name", "X-A:", "Ünïcode"] {
            assert!(!is_header_name(bad), "{bad}");
        }
        refused(|i| check_header_name(i, &["h"], "X Sig"), "`X Sig` is not a valid header name");
    }

    #[test]
    fn headers_are_checked_by_name_and_value() {
        let headers = Map::from_iter([
            ("Authorization".to_owned(), "Bearer {{ secrets.token }}".to_owned()),
            ("Bad Name".to_owned(), "x".to_owned()),
            ("X-A".to_owned(), "a\r\nX-B: b".to_owned()),
        ]);
        let (passed, shown) = run(|i| check_headers(i, "headers", &headers));
        assert!(!passed);
        assert_eq!(
            shown,
            [
                "headers.Bad Name: `Bad Name` is not a valid header name: use letters, digits and `-`, without \
                 spaces or `:`",
                "headers.X-A: a header value must be a single line",
            ]
        );
    }

    #[test]
    fn single_line_values() {
        passed(|i| check_single_line(i, &["subject_prefix"], "[nexus]", "the subject prefix"));
        let message = refused(|i| check_single_line(i, &["s"], "a\nb", "the subject prefix"), "single line");
        assert_eq!(message, "s: the subject prefix must be a single line");
    }

    #[test]
    fn environment_variable_names() {
        passed(|i| check_env_name(i, &["env", "RUST_LOG"], "RUST_LOG"));
        passed(|i| check_env_name(i, &["env", "k"], "{{ env.vars.key }}"));
        refused(|i| check_env_name(i, &["env", ""], ""), "cannot be empty");
        refused(|i| check_env_name(i, &["env", "A=B"], "A=B"), "`A=B` is not a valid environment variable name");
        refused(|i| check_env_name(i, &["env", "A"], "A\0"), "NUL");
    }

    #[test]
    fn durations_must_be_positive() {
        let zero = Some(Duration(std::time::Duration::ZERO));
        passed(|i| check_positive_duration(i, &["timeout"], None, "timeout"));
        passed(|i| check_positive_duration(i, &["timeout"], Some(Duration::parse("1s").unwrap()), "timeout"));
        let message = refused(|i| check_positive_duration(i, &["timeout"], zero, "timeout"), "longer than zero");
        assert_eq!(message, "timeout: the timeout must be longer than zero");
    }

    #[test]
    fn lists_and_texts_must_not_be_empty() {
        passed(|i| check_non_empty(i, &["to"], &["ops@example.com"], "recipient"));
        let message = refused(|i| check_non_empty::<String>(i, &["to"], &[], "recipient"), "at least one");
        assert_eq!(message, "to: give at least one recipient");
        passed(|i| check_not_blank(i, &["shell"], "sh", "shell", "name one"));
        let message = refused(|i| check_not_blank(i, &["shell"], "  ", "shell", "name one such as `sh`"), "empty");
        assert_eq!(message, "shell: the shell is empty; name one such as `sh`");
    }

    #[test]
    fn paired_fields_come_together() {
        passed(|i| check_together(i, ("username", true), ("password", true), "for no authentication"));
        passed(|i| check_together(i, ("username", false), ("password", false), "for no authentication"));
        let message = refused(|i| check_together(i, ("username", true), ("password", false), "at all"), "give both");
        assert_eq!(message, "password: `username` needs `password`; give both, or neither at all");
        let message = refused(|i| check_together(i, ("username", false), ("password", true), "at all"), "give both");
        assert!(message.starts_with("username: `password` needs `username`"), "{message}");
    }

    #[test]
    fn masked_values_show_keys_only() {
        let headers = Map::from_iter([("Authorization".to_owned(), "Bearer s3cr3t".to_owned())]);
        let shown = format!("{:?}", MaskedValues(&headers));
        assert_eq!(shown, r#"{"Authorization": "***"}"#);
    }
}
