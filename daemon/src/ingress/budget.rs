//! The ingress byte budget (`gateway.max_ingress_bytes`): one semaphore whose permits are
//! payload bytes, shared by every device protocol, so that what devices have sent and the
//! outbox has not yet committed is bounded in memory whatever the number of connections:
//!
//! * **MQTT**: a PUBLISH holds its payload's bytes from the moment it is decoded until it is
//!   answered; while they cannot be granted, its connection reads nothing more (TCP
//!   back-pressure on the client). A connection therefore holds at most one decoded packet
//!   outside the budget.
//! * **HTTP**: a request reserves its declared `Content-Length` (or `http_ingest.max_body` when
//!   chunked) *before* its body is read, and keeps it until it is answered; it waits meanwhile.
//! * **CoAP**: a request whose payload's bytes are not available at once is answered 5.03 with
//!   Max-Age 1 (a UDP server cannot push back); counted in `outpost_coap_overloaded_total`.
//!   Block1 transfers in progress are bounded separately (`coap.max_body` each).
//! * **The outbox queue**: every append comes from one of the above, holding its bytes.
//!
//! Drivers are not counted: their readings are small and their queue is bounded by count.
//! `outpost_ingress_budget_bytes` is the budget, `outpost_ingress_budget_used_bytes` what is
//! held now.

use std::sync::Arc;

use outpost_mqtt::settings::Budget;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::gauge::ConstGauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Cheap to clone: clones share the budget.
#[derive(Debug, Clone)]
pub struct IngressBudget {
    budget: Budget,
}

impl IngressBudget {
    pub fn new(total: usize) -> IngressBudget {
        let total = total.min(Semaphore::MAX_PERMITS);
        IngressBudget {
            budget: Budget {
                bytes: Arc::new(Semaphore::new(total)),
                total,
            },
        }
    }

    /// The MQTT server's view of the same budget.
    pub fn for_mqtt(&self) -> Budget {
        self.budget.clone()
    }

    /// Waits (in order of arrival) until `len` bytes are free and holds them until the permit
    /// is dropped.
    pub async fn take(&self, len: usize) -> Option<OwnedSemaphorePermit> {
        Arc::clone(&self.budget.bytes)
            .acquire_many_owned(self.budget.permits(len))
            .await
            .ok()
    }

    /// `len` bytes now, or `None` if they are not free.
    pub fn try_take(&self, len: usize) -> Option<OwnedSemaphorePermit> {
        Arc::clone(&self.budget.bytes)
            .try_acquire_many_owned(self.budget.permits(len))
            .ok()
    }

    /// Bytes held now.
    pub fn used(&self) -> usize {
        self.budget
            .total
            .saturating_sub(self.budget.bytes.available_permits())
    }
}

impl Collector for IngressBudget {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let figures = [
            (
                "outpost_ingress_budget_bytes",
                "The ingress byte budget (gateway.max_ingress_bytes)",
                self.budget.total,
            ),
            (
                "outpost_ingress_budget_used_bytes",
                "Payload bytes received from devices and not yet answered (held of the budget)",
                self.used(),
            ),
        ];
        for (name, help, value) in figures {
            let metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX)).encode(metric)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bytes_are_held_until_released_and_waiters_go_in_order() {
        let budget = IngressBudget::new(100);
        let a = budget.try_take(60).expect("60 of 100");
        assert!(budget.try_take(50).is_none(), "only 40 left");
        assert_eq!(budget.used(), 60);
        // Larger than the whole budget: takes all of it rather than waiting forever.
        let waiter = tokio::spawn({
            let budget = budget.clone();
            async move { budget.take(1_000).await.map(|p| p.num_permits()) }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(a);
        assert_eq!(waiter.await.unwrap(), Some(100));
        assert_eq!(budget.used(), 0);
    }
}
