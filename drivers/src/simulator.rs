//! A built-in virtual sensor: for demos, installation checks and load tests.
//!
//! Every `interval` it emits one JSON reading per simulated device, numbered from 0 per device
//! (`"n"`), with `time_ms` like every driver's reading, padded to `payload_bytes`. Because each reading waits for room in the sink, the
//! readings of a device reach the outbox gap-free and in order.

use std::time::Duration;

use outpost_config::SimulatorConfig;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::{Driver, DriverError, DriverFuture, Reading, ReadingSink, now_unix_ms};

#[derive(Debug)]
pub struct Simulator {
    config: SimulatorConfig,
}

impl Simulator {
    pub fn new(config: SimulatorConfig) -> Self {
        Self { config }
    }

    /// The id of simulated device `n`.
    pub fn device_id(name: &str, n: u32) -> String {
        format!("{name}-{n}")
    }

    fn reading(&self, device: u32, n: u64) -> Reading {
        let c = &self.config;
        let device_id = Self::device_id(&c.name, device);
        // A deterministic, plausible value: a slow sine around 21 °C.
        let value = 21.0 + 3.0 * ((n as f64) / 20.0 + f64::from(device)).sin();
        let received_at_ms = now_unix_ms();
        let mut payload = format!(
            r#"{{"device":"{device_id}","n":{n},"temperature":{value:.2},"time_ms":{received_at_ms},"pad":""#
        );
        let target = c.payload_bytes.max(payload.len() + 2);
        while payload.len() + 2 < target {
            payload.push('x');
        }
        payload.push_str("\"}");
        Reading {
            driver: c.name.clone(),
            topic: c.topic.replace("{device}", &device_id),
            device_id,
            route: c.route.clone(),
            content_type: Some("application/json".to_owned()),
            payload: payload.into_bytes(),
            received_at_ms,
        }
    }

    async fn emit(
        self: Box<Self>,
        sink: ReadingSink,
        shutdown: CancellationToken,
    ) -> Result<(), DriverError> {
        let mut tick = tokio::time::interval(self.config.interval.max(Duration::from_millis(1)));
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut n: u64 = 0;
        loop {
            if self.config.max_readings.is_some_and(|max| n >= max) {
                tracing::info!(readings = n, "Simulator reached max_readings; idle");
                shutdown.cancelled().await;
                return Ok(());
            }
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                _ = tick.tick() => {}
            }
            for device in 0..self.config.devices {
                let reading = self.reading(device, n);
                // Finish the round even when shutdown arrives meanwhile, so every device has the
                // same count; the sink drains into the outbox before the writer stops.
                sink.send(reading)
                    .await
                    .map_err(|_| DriverError::SinkClosed)?;
            }
            n += 1;
        }
    }
}

impl Driver for Simulator {
    fn name(&self) -> &str {
        &self.config.name
    }

    fn run(self: Box<Self>, sink: ReadingSink, shutdown: CancellationToken) -> DriverFuture {
        Box::pin(self.emit(sink, shutdown))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_is_padded_json_with_counter() {
        let sim = Simulator::new(SimulatorConfig {
            name: "sim".into(),
            payload_bytes: 100,
            ..SimulatorConfig::default()
        });
        let r = sim.reading(2, 7);
        assert_eq!(r.payload.len(), 100);
        assert_eq!(r.device_id, "sim-2");
        assert_eq!(r.topic, "sim/sim-2/reading");
        let text = String::from_utf8(r.payload).unwrap();
        assert!(
            text.starts_with(r#"{"device":"sim-2","n":7,"temperature":"#),
            "{text}"
        );
        assert!(text.ends_with("\"}"), "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["time_ms"], r.received_at_ms);
    }

    #[tokio::test(start_paused = true)]
    async fn emits_numbered_rounds_until_max() {
        let sim = Simulator::new(SimulatorConfig {
            name: "s".into(),
            devices: 3,
            max_readings: Some(4),
            ..SimulatorConfig::default()
        });
        let (tx, mut rx) = tokio::sync::mpsc::channel(100);
        let stop = CancellationToken::new();
        let task = tokio::spawn(Box::new(sim).run(tx, stop.clone()));
        let mut got = Vec::new();
        for _ in 0..12 {
            got.push(rx.recv().await.unwrap());
        }
        stop.cancel();
        task.await.unwrap().unwrap();
        for (i, r) in got.iter().enumerate() {
            let expected = format!(r#""device":"s-{}","n":{}"#, i % 3, i / 3);
            assert!(String::from_utf8_lossy(&r.payload).contains(&expected));
        }
        assert!(rx.recv().await.is_none(), "no reading beyond max_readings");
    }
}
