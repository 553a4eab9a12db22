//! The plugin's `tracing` events reach the host's subscriber, under a `plugin{name}`
//! span, at their level. The test installs the process's global subscriber (plugin
//! threads do not see a thread-local one); no other test does.

use crate::fixture;

use std::sync::{Arc, Mutex};

use serde_json::json;
use tracing::Subscriber;
use tracing_subscriber::layer::{Context, SubscriberExt as _};
use tracing_subscriber::registry::LookupSpan;

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<(String, String, String)>>>);

struct Message(String);
impl tracing::field::Visit for Message {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }
}

struct Name(String);
impl tracing::field::Visit for Name {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "name" {
            self.0 = format!("{value:?}");
        }
    }
}

#[derive(Default)]
struct SpanName(String);

impl<S: Subscriber + for<'a> LookupSpan<'a>> tracing_subscriber::Layer<S> for Capture {
    fn on_new_span(&self, attrs: &tracing::span::Attributes<'_>, id: &tracing::span::Id, ctx: Context<'_, S>) {
        let mut name = Name(String::new());
        attrs.record(&mut name);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(SpanName(format!("{}{{{}}}", attrs.metadata().name(), name.0)));
        }
    }

    fn on_event(&self, event: &tracing::Event<'_>, ctx: Context<'_, S>) {
        let mut m = Message(String::new());
        event.record(&mut m);
        let span = ctx
            .event_span(event)
            .and_then(|s| s.extensions().get::<SpanName>().map(|n| n.0.clone()))
            .unwrap_or_default();
        self.0.lock().unwrap().push((event.metadata().level().to_string(), span, m.0));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_events_reach_the_host_under_a_plugin_span() {
    let capture = Capture::default();
    let subscriber =
        tracing_subscriber::registry().with(capture.clone()).with(tracing_subscriber::filter::LevelFilter::INFO);
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let catalog = fixture::catalog("plain");
    let s = catalog.services.get("fixture-service").unwrap().build(json!({"greeting": "hi"})).unwrap();
    s.invoke("log", json!({})).await.unwrap();

    let events = capture.0.lock().unwrap().clone();
    let span = "plugin{nexus-plugin-fixture}".to_owned();
    assert!(events.contains(&("ERROR".into(), span.clone(), "an error from the plugin code=42".into())), "{events:?}");
    assert!(events.contains(&("WARN".into(), span.clone(), "a warning from the plugin".into())), "{events:?}");
    assert!(events.contains(&("INFO".into(), span.clone(), "info from the plugin".into())), "{events:?}");
    // Below the host's level: not shown.
    assert!(!events.iter().any(|e| e.2.contains("debug from the plugin")), "{events:?}");
}
