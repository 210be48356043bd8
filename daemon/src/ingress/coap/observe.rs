//! Devices waiting for commands over CoAP (RFC 7641 Observe on `/c`): who observes, and the
//! Confirmable notification each has in flight.
//!
//! * One observation per device: a new registration replaces the old one (a device that
//!   rebooted registers again from another port or with another token).
//! * A notification lists the device's queued commands (as many as fit [`MAX_BODY`]) and is
//!   Confirmable: the commands are marked delivered only when the device acknowledges it. It is
//!   retransmitted after [`ACK_TIMEOUT`] doubling each time, at most [`MAX_RETRANSMIT`] times
//!   (RFC 7252 §4.2); then, or on a Reset, the observation ends and the commands stay queued.
//! * At most one notification per device is in flight; a command queued meanwhile is sent in
//!   the next one (`more`), right after the acknowledgement.
//! * At most `max` observations (a new one beyond it is refused with 5.03).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// RFC 7252 §4.8 ACK_TIMEOUT (without the random factor: the retransmissions are checked on a
/// one-second tick anyway).
pub const ACK_TIMEOUT: Duration = Duration::from_secs(2);
/// RFC 7252 §4.8 MAX_RETRANSMIT.
pub const MAX_RETRANSMIT: u32 = 4;
/// The most JSON one command response or notification carries: it must fit one datagram
/// (no Block2). A single larger command is sent alone.
pub const MAX_BODY: usize = 1024;

#[derive(Debug)]
struct Observer {
    peer: SocketAddr,
    token: Vec<u8>,
    /// The last Observe sequence number used.
    seq: u32,
    sending: Option<Sending>,
    /// A command was queued while a notification was in flight.
    more: bool,
}

#[derive(Debug)]
struct Sending {
    mid: u16,
    ids: Vec<i64>,
    bytes: Arc<[u8]>,
    retransmits: u32,
    next_at: Instant,
}

/// A notification to send now.
#[derive(Debug, Clone, PartialEq)]
pub struct Send {
    pub peer: SocketAddr,
    pub bytes: Arc<[u8]>,
}

/// What an acknowledgement or reset of a notification meant.
#[derive(Debug, Clone, PartialEq)]
pub enum Answered {
    /// The device has these commands; `more` asks for the next notification.
    Delivered {
        device: String,
        ids: Vec<i64>,
        more: bool,
    },
    /// The device rejected the notification: no longer observing.
    Cancelled { device: String },
}

/// The observation table.
#[derive(Debug)]
pub struct Observers {
    by_device: HashMap<String, Observer>,
    by_mid: HashMap<u16, String>,
    max: usize,
}

impl Observers {
    pub fn new(max: usize) -> Self {
        Self {
            by_device: HashMap::new(),
            by_mid: HashMap::new(),
            max,
        }
    }

    pub fn len(&self) -> usize {
        self.by_device.len()
    }

    /// Registers `device` (replacing its observation); the sequence number of the response, or
    /// `None` when the table is full.
    pub fn register(&mut self, device: &str, peer: SocketAddr, token: &[u8]) -> Option<u32> {
        if !self.by_device.contains_key(device) && self.by_device.len() >= self.max {
            return None;
        }
        if let Some(old) = self.by_device.remove(device)
            && let Some(s) = old.sending
        {
            self.by_mid.remove(&s.mid);
        }
        self.by_device.insert(
            device.to_owned(),
            Observer {
                peer,
                token: token.to_vec(),
                seq: 0,
                sending: None,
                more: false,
            },
        );
        Some(0)
    }

    /// Ends `device`'s observation.
    pub fn deregister(&mut self, device: &str) {
        if let Some(o) = self.by_device.remove(device)
            && let Some(s) = o.sending
        {
            self.by_mid.remove(&s.mid);
        }
    }

    /// A command was queued for `device`: true when a notification should be built now (the
    /// device observes and has none in flight); with one in flight it is remembered instead.
    pub fn wants(&mut self, device: &str) -> bool {
        match self.by_device.get_mut(device) {
            Some(o) if o.sending.is_some() => {
                o.more = true;
                false
            }
            Some(_) => true,
            None => false,
        }
    }

    /// The peer, token and next sequence number for a notification to `device`.
    pub fn next(&mut self, device: &str) -> Option<(SocketAddr, Vec<u8>, u32)> {
        let o = self.by_device.get_mut(device)?;
        if o.sending.is_some() {
            return None;
        }
        o.seq = (o.seq + 1) & 0x00FF_FFFF;
        Some((o.peer, o.token.clone(), o.seq))
    }

    /// Records the notification just sent to `device` (message id `mid`, carrying `ids`).
    pub fn sent(&mut self, device: &str, mid: u16, ids: Vec<i64>, bytes: Arc<[u8]>, now: Instant) {
        if let Some(o) = self.by_device.get_mut(device) {
            o.more = false;
            o.sending = Some(Sending {
                mid,
                ids,
                bytes,
                retransmits: 0,
                next_at: now + ACK_TIMEOUT,
            });
            self.by_mid.insert(mid, device.to_owned());
        }
    }

    /// An Acknowledgement (or, with `reset`, a Reset) with message id `mid` arrived.
    pub fn answered(&mut self, mid: u16, reset: bool) -> Option<Answered> {
        let device = self.by_mid.remove(&mid)?;
        if reset {
            self.by_device.remove(&device);
            return Some(Answered::Cancelled { device });
        }
        let o = self.by_device.get_mut(&device)?;
        let sending = o.sending.take()?;
        Some(Answered::Delivered {
            device,
            ids: sending.ids,
            more: std::mem::take(&mut o.more),
        })
    }

    /// Notifications due for retransmission; observations whose notification went unanswered
    /// [`MAX_RETRANSMIT`] times end (returned as their device ids).
    pub fn due(&mut self, now: Instant) -> (Vec<Send>, Vec<String>) {
        let (mut sends, mut gone) = (Vec::new(), Vec::new());
        for (device, o) in &mut self.by_device {
            let Some(s) = o.sending.as_mut().filter(|s| s.next_at <= now) else {
                continue;
            };
            if s.retransmits >= MAX_RETRANSMIT {
                gone.push(device.clone());
                continue;
            }
            s.retransmits += 1;
            s.next_at = now + ACK_TIMEOUT * 2u32.pow(s.retransmits);
            sends.push(Send {
                peer: o.peer,
                bytes: Arc::clone(&s.bytes),
            });
        }
        for device in &gone {
            self.deregister(device);
        }
        (sends, gone)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> SocketAddr {
        "127.0.0.1:5683".parse().unwrap()
    }

    #[test]
    fn a_notification_is_acknowledged_and_a_command_queued_meanwhile_follows() {
        let mut o = Observers::new(2);
        assert!(!o.wants("d"));
        assert_eq!(o.register("d", peer(), &[1, 2]), Some(0));
        assert!(o.wants("d"));
        let (to, token, seq) = o.next("d").unwrap();
        assert_eq!((to, token, seq), (peer(), vec![1, 2], 1));
        let now = Instant::now();
        o.sent("d", 7, vec![10, 11], Arc::from(&b"n"[..]), now);
        assert!(!o.wants("d"), "one in flight: remembered, not sent");
        assert_eq!(o.next("d"), None);
        assert_eq!(o.answered(8, false), None);
        assert_eq!(
            o.answered(7, false),
            Some(Answered::Delivered {
                device: "d".into(),
                ids: vec![10, 11],
                more: true
            })
        );
        assert_eq!(o.next("d").map(|n| n.2), Some(2));
    }

    #[test]
    fn unanswered_notifications_are_retransmitted_then_the_observation_ends() {
        let mut o = Observers::new(1);
        o.register("d", peer(), &[]);
        assert_eq!(o.register("e", peer(), &[]), None, "full");
        let t0 = Instant::now();
        o.next("d").unwrap();
        o.sent("d", 1, vec![5], Arc::from(&b"n"[..]), t0);
        assert!(o.due(t0).0.is_empty());
        let mut at = t0;
        for attempt in 1..=MAX_RETRANSMIT {
            at += ACK_TIMEOUT * 2u32.pow(attempt - 1);
            let (sends, gone) = o.due(at);
            assert_eq!(
                (sends.len(), gone.len()),
                (1, 0),
                "retransmission {attempt}"
            );
        }
        at += ACK_TIMEOUT * 2u32.pow(MAX_RETRANSMIT);
        assert_eq!(o.due(at), (Vec::new(), vec!["d".to_owned()]));
        assert_eq!(o.len(), 0);
        assert_eq!(o.answered(1, false), None);
    }

    #[test]
    fn a_reset_cancels_and_a_new_registration_replaces_the_old() {
        let mut o = Observers::new(4);
        o.register("d", peer(), &[1]);
        o.next("d").unwrap();
        o.sent("d", 3, vec![1], Arc::from(&b"n"[..]), Instant::now());
        o.register("d", peer(), &[2]);
        assert_eq!(
            o.answered(3, false),
            None,
            "the old notification is forgotten"
        );
        assert_eq!(o.next("d").unwrap().1, vec![2]);
        o.sent("d", 4, vec![1], Arc::from(&b"n"[..]), Instant::now());
        assert_eq!(
            o.answered(4, true),
            Some(Answered::Cancelled { device: "d".into() })
        );
        assert!(!o.wants("d"));
    }
}
