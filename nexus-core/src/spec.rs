//! Helpers for the pure `validate` of component specs: the checks every kind needs,
//! written once.

/// Whether a spec value is a template (`{{ … }}`), rendered only when the component is
/// built; format checks do not apply to it.
pub fn is_template(value: &str) -> bool {
    value.contains("{{") || value.contains("{%")
}
