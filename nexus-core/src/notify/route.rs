//! Which routes take an event: pure matching over `routes` of monitoring_registry.yaml.

use crate::model::{Labels, Route, Ssot};
use crate::traits::Event;

/// Event types a route takes when its `match.events` is empty: failures and
/// recoveries, not every success.
pub const DEFAULT_EVENTS: &[&str] = &["run.failed", "run.recovered"];

/// Whether an event-type pattern (`run.failed`, `step.*`, `*`) takes `kind`.
pub fn event_matches(pattern: &str, kind: &str) -> bool {
    pattern == "*"
        || pattern == kind
        || pattern
            .strip_suffix(".*")
            .is_some_and(|prefix| kind.strip_prefix(prefix).is_some_and(|r| r.starts_with('.')))
}

/// The labels routes see for an event: the event's own, then its pipeline's, then its
/// environment's (the first one set wins).
pub fn labels_of(ssot: &Ssot, event: &Event) -> Labels {
    let mut labels = event.labels.clone();
    let pipeline = event.pipeline.as_ref().and_then(|p| ssot.pipelines.pipelines.get(p));
    let environment = event.environment.as_ref().and_then(|e| ssot.orchestration.environments.get(e));
    for source in [pipeline.map(|p| &p.labels), environment.map(|e| &e.labels)].into_iter().flatten() {
        for (k, v) in source {
            labels.entry(k.clone()).or_insert_with(|| v.clone());
        }
    }
    labels
}

/// Whether `route` takes events of type `kind` (its `match.events`, or the defaults).
fn takes_kind(route: &Route, kind: &str) -> bool {
    let events = &route.matches.events;
    if events.is_empty() { DEFAULT_EVENTS.contains(&kind) } else { events.iter().any(|p| event_matches(p, kind)) }
}

/// Whether `route` takes `event` (whose labels, merged, are `labels`).
pub fn route_matches(route: &Route, event: &Event, labels: &Labels) -> bool {
    let m = &route.matches;
    let in_list = |list: &[String], value: &Option<String>| {
        list.is_empty() || value.as_ref().is_some_and(|v| list.iter().any(|x| x == v))
    };
    takes_kind(route, &event.kind)
        && in_list(&m.pipelines, &event.pipeline)
        && in_list(&m.environments, &event.environment)
        && m.min_severity.is_none_or(|min| event.severity >= min)
        && m.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The routes that take `event`, in order: the first match wins unless it says
/// `continue: true`.
pub fn matching_routes<'a>(ssot: &'a Ssot, event: &Event) -> Vec<&'a Route> {
    // Most events (every step start and success) are of a type no route takes: they
    // are turned away before the labels are merged, without allocating.
    if !ssot.monitoring.routes.iter().any(|r| takes_kind(r, &event.kind)) {
        return Vec::new();
    }
    select(&ssot.monitoring.routes, event, &labels_of(ssot, event))
}

/// The routes of `routes` that take `event`, first match winning unless it continues.
pub fn select<'a>(routes: &'a [Route], event: &Event, labels: &Labels) -> Vec<&'a Route> {
    let mut taken = Vec::new();
    for route in routes {
        if route_matches(route, event, labels) {
            taken.push(route);
            if !route.continue_matching {
                break;
            }
        }
    }
    taken
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{RouteMatch, Severity};

    fn route(name: &str, matches: RouteMatch, continue_matching: bool) -> Route {
        Route { name: name.into(), matches, channels: vec!["c".into()], dedup_window: None, continue_matching }
    }

    fn event(kind: &str, env: &str, severity: Severity) -> Event {
        let mut e = Event::new(kind, severity, "m");
        e.pipeline = Some("deploy".into());
        e.environment = Some(env.into());
        e
    }

    #[test]
    fn patterns_match_exactly_by_prefix_or_all() {
        assert!(event_matches("run.failed", "run.failed"));
        assert!(event_matches("run.*", "run.failed"));
        assert!(event_matches("*", "health.changed"));
        assert!(!event_matches("run.*", "runner.x"));
        assert!(!event_matches("run.failed", "run.succeeded"));
    }

    #[test]
    fn an_empty_event_list_means_failures_and_recoveries() {
        let r = route("r", RouteMatch::default(), false);
        let labels = Labels::new();
        assert!(route_matches(&r, &event("run.failed", "prod", Severity::Error), &labels));
        assert!(route_matches(&r, &event("run.recovered", "prod", Severity::Info), &labels));
        assert!(!route_matches(&r, &event("run.succeeded", "prod", Severity::Info), &labels));
        assert!(!route_matches(&r, &event("step.failed", "prod", Severity::Error), &labels));
    }

    #[test]
    fn every_condition_must_hold() {
        let m = RouteMatch {
            events: vec!["run.*".into()],
            pipelines: vec!["deploy".into()],
            environments: vec!["prod".into()],
            min_severity: Some(Severity::Error),
            labels: Labels::from_iter([("team".to_owned(), "web".to_owned())]),
        };
        let r = route("r", m, false);
        let web = Labels::from_iter([("team".to_owned(), "web".to_owned())]);
        assert!(route_matches(&r, &event("run.failed", "prod", Severity::Error), &web));
        assert!(!route_matches(&r, &event("run.failed", "staging", Severity::Error), &web));
        assert!(!route_matches(&r, &event("run.failed", "prod", Severity::Warning), &web));
        assert!(!route_matches(&r, &event("run.failed", "prod", Severity::Error), &Labels::new()));
        assert!(!route_matches(&r, &event("step.failed", "prod", Severity::Error), &web));
    }

    #[test]
    fn first_match_wins_unless_it_continues() {
        let routes = vec![
            route("a", RouteMatch::default(), true),
            route("b", RouteMatch::default(), false),
            route("c", RouteMatch::default(), false),
        ];
        let names: Vec<&str> = select(&routes, &event("run.failed", "prod", Severity::Error), &Labels::new())
            .iter()
            .map(|r| r.name.as_str())
            .collect();
        assert_eq!(names, ["a", "b"]);
    }
}
