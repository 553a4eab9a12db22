//! The in-process event bus: monitors, notifiers and the CLI subscribe to it.

use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use crate::traits::Event;

/// Events published by the engine, delivered to every subscriber in order and none lost.
///
/// The engine never waits for a subscriber: each has its own unbounded queue. (A
/// bounded broadcast channel used to drop the oldest events of a subscriber that fell
/// behind, and one scheduler pass can publish thousands — every step skipped after a
/// failure — so a notification route could miss the `step.failed` that mattered.)
#[derive(Clone, Default)]
pub struct EventBus {
    subscribers: Arc<Mutex<Vec<mpsc::UnboundedSender<Event>>>>,
}

impl EventBus {
    /// A bus without subscribers.
    pub fn new() -> Self {
        EventBus::default()
    }

    /// Publishes an event to every current subscriber; subscribers that went away are
    /// forgotten.
    pub fn publish(&self, event: Event) {
        let mut subscribers = self.subscribers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        subscribers.retain(|s| s.send(event.clone()).is_ok());
    }

    /// A receiver of every event published from now on. It yields `None` once every
    /// clone of the bus is dropped.
    pub fn subscribe(&self) -> mpsc::UnboundedReceiver<Event> {
        let (sender, receiver) = mpsc::unbounded_channel();
        self.subscribers.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(sender);
        receiver
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Severity;

    #[test]
    fn a_subscriber_behind_by_thousands_of_events_gets_every_one_in_order() {
        let bus = EventBus::new();
        let mut first = bus.subscribe();
        let mut second = bus.subscribe();
        for i in 0..10_000 {
            bus.publish(Event::new("step.skipped", Severity::Info, format!("s{i} skipped")));
        }
        for receiver in [&mut first, &mut second] {
            for i in 0..10_000 {
                let event = receiver.try_recv().expect("no event lost");
                assert_eq!(event.message, format!("s{i} skipped"));
            }
            assert!(receiver.try_recv().is_err(), "nothing more than was published");
        }
    }

    #[test]
    fn a_dropped_subscriber_is_forgotten_and_the_stream_ends_with_the_bus() {
        let bus = EventBus::new();
        let gone = bus.subscribe();
        let mut kept = bus.subscribe();
        drop(gone);
        bus.publish(Event::new("run.started", Severity::Info, "started"));
        assert_eq!(bus.subscribers.lock().unwrap().len(), 1);
        assert_eq!(kept.try_recv().expect("delivered").kind, "run.started");
        drop(bus);
        assert!(matches!(kept.try_recv(), Err(mpsc::error::TryRecvError::Disconnected)));
    }
}
