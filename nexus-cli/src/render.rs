//! Terminal rendering of diagnostics: miette's graphical report on a terminal
//! (without colour when `NO_COLOR` is set), plain compiler-style text otherwise.

use miette::{GraphicalReportHandler, GraphicalTheme, LabeledSpan, MietteDiagnostic, NamedSource, Severity};
use nexus_core::diag::{Level, Report};
use nexus_core::load::Sources;

/// Prints every diagnostic to stderr.
pub fn diagnostics(report: &Report, sources: &Sources) {
    let fancy = crate::fancy_stderr();
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    for d in &report.diagnostics {
        if !fancy {
            eprint!("{}", d.render_plain());
            eprintln!();
            continue;
        }
        let mut m = MietteDiagnostic::new(d.message.clone()).with_code(d.code).with_severity(match d.level {
            Level::Error => Severity::Error,
            Level::Warning => Severity::Warning,
        });
        if let Some(help) = &d.help {
            m = m.with_help(help.clone());
        }
        let theme = if no_color { GraphicalTheme::unicode_nocolor() } else { GraphicalTheme::unicode() };
        let handler = GraphicalReportHandler::new_themed(theme);
        let mut out = String::new();
        let source = d.location.as_ref().and_then(|loc| sources.files.iter().find(|f| f.path == loc.file));
        let result = match (&d.location, source) {
            (Some(loc), Some(file)) => {
                m = m.with_label(LabeledSpan::new(d.expected.clone(), loc.offset, loc.length));
                let report = miette::Report::new(m)
                    .with_source_code(NamedSource::new(loc.file.display().to_string(), file.text.to_string()));
                handler.render_report(&mut out, report.as_ref())
            }
            _ => {
                if let Some(expected) = &d.expected {
                    m = m.with_help(format!(
                        "expected {expected}{}",
                        d.help.as_deref().map(|h| format!("; {h}")).unwrap_or_default()
                    ));
                }
                handler.render_report(&mut out, &m)
            }
        };
        match result {
            Ok(()) => eprint!("{out}"),
            Err(_) => eprint!("{}", d.render_plain()),
        }
    }
}
