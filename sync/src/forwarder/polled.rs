//! librdkafka producers with Outpost's own polling thread, and what each does with its
//! delivery reports ([`OnDelivery`]).
//!
//! # Why not rdkafka's `ThreadedProducer` / `FutureProducer`
//!
//! Their polling thread calls `BaseProducer::poll` in cycles of 100 ms, and that loop hands
//! librdkafka the time left rounded *down* to whole milliseconds. Once less than a millisecond
//! is left it polls with a zero timeout, in a tight loop, until the cycle is over: the end of
//! every cycle is spent spinning, about 1 % of a core per producer whether it has work or not
//! (a `perf` profile of a backlog drain showed `clock_gettime` and a mutex under
//! `BaseProducer::poll` on both producers' polling threads, the idle heartbeat producer
//! included; the same bug was fixed inside librdkafka's own main loop, librdkafka #4671).
//!
//! Here a cycle is [`POLL_CYCLE`]: 500 ms plus 50 µs. On an idle producer its one timed wait is
//! for the whole 500 ms, and Linux ends a timed wait up to 50 µs *after* its deadline (the
//! default timer slack), so the loop mostly finds the cycle over and returns; at worst it spins
//! the 50 µs. A cycle that delivery reports interrupt still ends with a fraction of a
//! millisecond of spinning, so a busy producer keeps some of the cost: at most 1 ms per
//! 500 ms. The price of the longer cycle: dropping the producer waits up to 500 ms for its
//! thread (only at shutdown and after a fatal producer error).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::KafkaError;
use rdkafka::message::DeliveryResult;
use rdkafka::producer::{BaseProducer, ProducerContext};
use rdkafka::util::IntoOpaque;

use super::client;

/// One polling cycle (see the module documentation for the 50 µs).
const POLL_CYCLE: Duration = Duration::from_micros(500_050);

/// What a producer does with a delivery report.
pub trait OnDelivery: Send + Sync + 'static {
    /// What each record carries to its report.
    type Opaque: IntoOpaque;

    fn delivered(&self, result: Result<(), KafkaError>, opaque: Self::Opaque);
}

/// The forwarder's client context ([`client::Context`]: errors and logs) with `D` handling
/// the delivery reports.
pub struct Delivering<D> {
    client: client::Context,
    on_delivery: D,
}

impl<D: OnDelivery> ClientContext for Delivering<D> {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        self.client.log(level, fac, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.client.error(error, reason);
    }
}

impl<D: OnDelivery> ProducerContext for Delivering<D> {
    type DeliveryOpaque = D::Opaque;

    fn delivery(&self, result: &DeliveryResult<'_>, opaque: D::Opaque) {
        let result = match result {
            Ok(_) => Ok(()),
            Err((error, _)) => Err(error.clone()),
        };
        self.on_delivery.delivered(result, opaque);
    }
}

/// A `BaseProducer` polled by its own thread ("kafka-poll"), which stops when this is dropped
/// (within one cycle).
pub struct PolledProducer<D: OnDelivery> {
    producer: Arc<BaseProducer<Delivering<D>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl<D: OnDelivery> PolledProducer<D> {
    pub fn new(
        config: &ClientConfig,
        client: client::Context,
        on_delivery: D,
    ) -> Result<Self, KafkaError> {
        let producer: Arc<BaseProducer<Delivering<D>>> =
            Arc::new(config.create_with_context(Delivering {
                client,
                on_delivery,
            })?);
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name("kafka-poll".into())
            .spawn({
                let (producer, stop) = (Arc::clone(&producer), Arc::clone(&stop));
                move || {
                    while !stop.load(Ordering::Relaxed) {
                        producer.poll(POLL_CYCLE);
                    }
                }
            })
            .map_err(|e| KafkaError::ClientCreation(format!("cannot start its thread: {e}")))?;
        Ok(Self {
            producer,
            stop,
            thread: Some(thread),
        })
    }

    pub fn producer(&self) -> &BaseProducer<Delivering<D>> {
        &self.producer
    }
}

impl<D: OnDelivery> Drop for PolledProducer<D> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        // The producer itself goes with the last `Arc`: here. Dropping it purges what it holds
        // and serves those reports (rdkafka's `BaseProducer` drop).
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Instant;

    use rdkafka::producer::BaseRecord;

    use super::*;

    /// Hands each report to the test.
    struct ToTest(mpsc::SyncSender<(u8, bool)>);

    impl OnDelivery for ToTest {
        type Opaque = usize;

        fn delivered(&self, result: Result<(), KafkaError>, opaque: usize) {
            let _ = self.0.send((opaque as u8, result.is_ok()));
        }
    }

    /// The polling thread serves delivery reports (here: records that expire, no broker
    /// answering) and stops within a cycle when the producer is dropped.
    #[test]
    fn the_polling_thread_serves_reports_and_stops_with_the_producer() {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", "127.0.0.1:9")
            .set("message.timeout.ms", "200");
        let (tx, rx) = mpsc::sync_channel(8);
        let context = client::Context {
            signals: Arc::default(),
            tls_check: None,
        };
        let producer = PolledProducer::new(&config, context, ToTest(tx)).unwrap();
        for token in 1..=3_usize {
            let record = BaseRecord::<str, [u8], usize>::with_opaque_to("t", token).payload(b"x");
            assert!(producer.producer().send(record).is_ok());
        }
        let mut reports: Vec<(u8, bool)> = (0..3)
            .map(|_| rx.recv_timeout(Duration::from_secs(10)).unwrap())
            .collect();
        reports.sort_unstable();
        assert_eq!(reports, [(1, false), (2, false), (3, false)]);
        let dropping = Instant::now();
        drop(producer);
        assert!(
            dropping.elapsed() < Duration::from_secs(2),
            "dropped in {:?}",
            dropping.elapsed()
        );
    }
}
