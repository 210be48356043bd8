//! Poison records: what Kafka refuses for good, and where such a record goes instead.
//!
//! A record must never hold up the others because Kafka will not take *it*. Every failed
//! delivery is classified ([`classify`]):
//!
//! * **Outage** (a broker unreachable, a timeout, a fenced or fatal producer, a purge): not the
//!   record's fault. The forwarder plans again from the outbox after a backoff; nothing counts.
//! * **Poison** (too large, invalid, a topic the broker refuses, does not have — after
//!   `dead_letter.unknown_topic_timeout` — or whose name it rejects): the record is moved aside
//!   at once and the others go on.
//! * **Retry** (anything else): another attempt after a backoff; after
//!   `dead_letter.max_attempts` failed attempts the record is poison too (reason `attempts`).
//!
//! Moved aside means: produced to `dead_letter.topic` (when set) with the original key,
//! payload, timestamp and headers plus the `outpost-error*` headers below, and deleted from
//! the outbox once that is acknowledged; when no topic is set, or it refuses the record too,
//! moved into the outbox's local dead-letter table in one transaction (listed, retried and
//! dropped through the API and `outpost dead-letters`). Nothing is lost either way.

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

/// Headers added to a record produced to the dead-letter topic (docs/KAFKA.md).
pub mod header {
    /// The error, as Kafka's client reported it.
    pub const ERROR: &str = "outpost-error";
    /// Why it is poison: [`super::Reason::as_str`].
    pub const REASON: &str = "outpost-error-reason";
    /// The Kafka topic that refused it.
    pub const TOPIC: &str = "outpost-error-topic";
    /// Failed delivery attempts.
    pub const ATTEMPTS: &str = "outpost-error-attempts";
}

/// Why a record is poison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Larger than the client or the broker accepts (`message.max.bytes`).
    TooLarge,
    /// The broker refused the record itself (corrupt, invalid, a policy violation).
    InvalidRecord,
    /// The broker refused access to the topic.
    TopicAuthorization,
    /// The broker refused the topic's name.
    InvalidTopic,
    /// The cluster did not have the topic within `dead_letter.unknown_topic_timeout`.
    UnknownTopic,
    /// `dead_letter.max_attempts` deliveries failed with errors not known to be permanent.
    Attempts,
}

impl Reason {
    pub const ALL: [Reason; 6] = [
        Reason::TooLarge,
        Reason::InvalidRecord,
        Reason::TopicAuthorization,
        Reason::InvalidTopic,
        Reason::UnknownTopic,
        Reason::Attempts,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::TooLarge => "too_large",
            Reason::InvalidRecord => "invalid_record",
            Reason::TopicAuthorization => "topic_authorization",
            Reason::InvalidTopic => "invalid_topic",
            Reason::UnknownTopic => "unknown_topic",
            Reason::Attempts => "attempts",
        }
    }
}

/// What a failed delivery means for its record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Kafka (or the way to it) is down, or the producer must be recreated: not the record's
    /// fault, and not counted against it.
    Outage,
    /// The record will never be accepted.
    Poison(Reason),
    /// Unknown: try again, counting the attempt.
    Retry,
}

/// Classifies the error of a failed produce or delivery.
pub fn classify(error: &KafkaError) -> Verdict {
    use RDKafkaErrorCode as C;
    let Some(code) = error.rdkafka_error_code() else {
        // Canceled (the producer went away), no code at all: the producer's problem.
        return Verdict::Outage;
    };
    match code {
        C::MessageSizeTooLarge | C::MessageBatchTooLarge | C::InvalidMessageSize => {
            Verdict::Poison(Reason::TooLarge)
        }
        C::InvalidMessage | C::InvalidRecord | C::BadMessage | C::PolicyViolation => {
            Verdict::Poison(Reason::InvalidRecord)
        }
        C::TopicAuthorizationFailed => Verdict::Poison(Reason::TopicAuthorization),
        C::InvalidTopic => Verdict::Poison(Reason::InvalidTopic),
        // librdkafka holds records of an unknown topic for `topic.metadata.propagation.max.ms`
        // (set from `dead_letter.unknown_topic_timeout`) before it fails them with these.
        C::UnknownTopic | C::UnknownTopicOrPartition | C::UnknownPartition => {
            Verdict::Poison(Reason::UnknownTopic)
        }
        C::BrokerTransportFailure
        | C::AllBrokersDown
        | C::MessageTimedOut
        | C::RequestTimedOut
        | C::OperationTimedOut
        | C::NetworkException
        | C::Resolve
        | C::SSL
        | C::Authentication
        | C::SaslAuthenticationFailed
        | C::ClusterAuthorizationFailed
        | C::TransactionalIdAuthorizationFailed
        | C::LeaderNotAvailable
        | C::NotLeaderForPartition
        | C::BrokerNotAvailable
        | C::NotEnoughReplicas
        | C::NotEnoughReplicasAfterAppend
        | C::QueueFull
        | C::PurgeQueue
        | C::PurgeInflight
        | C::Fatal
        | C::ProducerFenced
        | C::InvalidProducerEpoch
        | C::BrokerDestroy
        | C::DestroyBroker
        | C::State => Verdict::Outage,
        _ => Verdict::Retry,
    }
}

/// Failed attempts per record, for [`Reason::Attempts`]. Entries live while a record is
/// failing and are removed when it is delivered or moved aside, so the map holds at most the
/// records in flight when failures began.
#[derive(Debug, Default)]
pub struct Attempts {
    failed: std::collections::HashMap<u64, u32>,
}

impl Attempts {
    /// Counts a failed attempt of `seq`; true once it has reached `max`.
    pub fn fail(&mut self, seq: u64, max: u32) -> bool {
        let n = self.failed.entry(seq).or_insert(0);
        *n += 1;
        *n >= max
    }

    /// Failed attempts of `seq` so far.
    pub fn of(&self, seq: u64) -> u32 {
        self.failed.get(&seq).copied().unwrap_or(0)
    }

    pub fn forget(&mut self, seq: u64) {
        // Called for every delivered record: skip the hashing while nothing is failing.
        if !self.failed.is_empty() {
            self.failed.remove(&seq);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn produce(code: RDKafkaErrorCode) -> KafkaError {
        KafkaError::MessageProduction(code)
    }

    #[test]
    fn errors_are_classified_as_documented() {
        use RDKafkaErrorCode as C;
        for (code, reason) in [
            (C::MessageSizeTooLarge, Reason::TooLarge),
            (C::InvalidRecord, Reason::InvalidRecord),
            (C::PolicyViolation, Reason::InvalidRecord),
            (C::TopicAuthorizationFailed, Reason::TopicAuthorization),
            (C::InvalidTopic, Reason::InvalidTopic),
            (C::UnknownTopicOrPartition, Reason::UnknownTopic),
            (C::UnknownTopic, Reason::UnknownTopic),
        ] {
            assert_eq!(
                classify(&produce(code)),
                Verdict::Poison(reason),
                "{code:?}"
            );
        }
        for code in [
            C::AllBrokersDown,
            C::BrokerTransportFailure,
            C::MessageTimedOut,
            C::PurgeInflight,
            C::Fatal,
            C::NotLeaderForPartition,
            C::ClusterAuthorizationFailed,
        ] {
            assert_eq!(classify(&produce(code)), Verdict::Outage, "{code:?}");
        }
        assert_eq!(classify(&KafkaError::Canceled), Verdict::Outage);
        assert_eq!(classify(&produce(C::Unknown)), Verdict::Retry);
        assert_eq!(
            classify(&produce(C::OutOfOrderSequenceNumber)),
            Verdict::Retry
        );
    }

    #[test]
    fn attempts_are_counted_per_record_until_forgotten() {
        let mut a = Attempts::default();
        assert!(!a.fail(1, 3) && !a.fail(1, 3));
        assert!(!a.fail(2, 3));
        assert!(a.fail(1, 3), "the third failure reaches the limit");
        assert_eq!((a.of(1), a.of(2)), (3, 1));
        a.forget(1);
        assert_eq!(a.of(1), 0);
    }
}
