//! The in-process event bus: monitors, notifiers and the CLI subscribe to it.

use tokio::sync::broadcast;

use crate::traits::Event;

/// Events published by the engine. Subscribers that fall behind lose the oldest events
/// (they are in the journal too), the engine never waits for them.
#[derive(Clone)]
pub struct EventBus {
    sender: broadcast::Sender<Event>,
}

impl Default for EventBus {
    fn default() -> Self {
        EventBus::new()
    }
}

impl EventBus {
    /// A bus keeping up to 4,096 undelivered events per subscriber.
    pub fn new() -> Self {
        EventBus { sender: broadcast::channel(4096).0 }
    }

    /// Publishes an event to every current subscriber.
    pub fn publish(&self, event: Event) {
        // No subscriber is fine.
        let _ = self.sender.send(event);
    }

    /// A receiver of every event published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.sender.subscribe()
    }
}
