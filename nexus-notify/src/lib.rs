//! The notifier kinds of Nexus, each behind a feature of the same name (all on by
//! default). A new kind is a new crate plus one line in [`register`].

use nexus_core::{Catalog, Result};

/// Registers every notifier kind whose feature is on.
pub fn register(catalog: &mut Catalog) -> Result<()> {
    let _ = &catalog; // with every feature off, no line below uses it
    #[cfg(feature = "email")]
    nexus_notify_email::register_email_notifier(catalog)?;
    #[cfg(feature = "slack")]
    nexus_notify_slack::register_slack_notifier(catalog)?;
    #[cfg(feature = "pagerduty")]
    nexus_notify_pagerduty::register_pagerduty_notifier(catalog)?;
    #[cfg(feature = "webhook")]
    nexus_notify_webhook::register_webhook_notifier(catalog)?;
    Ok(())
}

#[cfg(all(test, feature = "email", feature = "slack", feature = "pagerduty", feature = "webhook"))]
mod tests {
    use super::*;

    #[test]
    fn registers_every_kind_with_a_valid_example() {
        let mut catalog = Catalog::new();
        register(&mut catalog).unwrap();
        assert_eq!(catalog.notifiers.names().collect::<Vec<_>>(), ["email", "pagerduty", "slack", "webhook"]);
        for kind in catalog.notifiers.iter() {
            assert!(kind.validate(&kind.example).is_empty(), "the example of `{}` is invalid", kind.kind);
        }
        assert!(register(&mut catalog).is_err(), "a second registration must clash");
    }
}
