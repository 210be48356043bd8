//! Unit tests of the registry: authentication (digests and argon2), inventory changes, monitoring
//! persistence, listing, commands.

use super::commands::CommandState;
use super::*;

fn open(dir: &Path) -> Registry {
    Registry::open(dir, Duration::from_secs(300)).unwrap()
}

fn new_device(id: &str) -> NewDevice {
    NewDevice {
        id: id.to_owned(),
        name: String::new(),
        model: String::new(),
        batch: String::new(),
        firmware: String::new(),
        location: String::new(),
        tags: Vec::new(),
        enabled: true,
        protocols: Protocol::ALL.to_vec(),
        mqtt_publish: None,
        mqtt_subscribe: None,
    }
}

#[tokio::test]
async fn authenticate_checks_secret_state_and_protocol() {
    let dir = tempfile::tempdir().unwrap();
    let reg = open(dir.path());
    let mut d = new_device("dev-1");
    d.protocols = vec![Protocol::Http, Protocol::Mqtt];
    let (device, secret) = reg.create(d).await.unwrap();
    assert!(device.has_secret);
    assert_eq!(device.protocols, vec![Protocol::Mqtt, Protocol::Http]);

    assert_eq!(
        reg.authenticate("dev-1", &secret, Protocol::Http).await,
        Ok(())
    );
    assert_eq!(
        reg.authenticate("dev-1", "wrong", Protocol::Http).await,
        Err(Refusal::BadSecret)
    );
    assert_eq!(
        reg.authenticate("nobody", &secret, Protocol::Http).await,
        Err(Refusal::UnknownDevice)
    );
    assert_eq!(
        reg.authenticate("dev-1", &secret, Protocol::Coap).await,
        Err(Refusal::ProtocolNotAllowed)
    );
    // A wrong secret is not told that the device is disabled.
    reg.set_enabled("dev-1", false).await.unwrap();
    assert_eq!(
        reg.authenticate("dev-1", "wrong", Protocol::Http).await,
        Err(Refusal::BadSecret)
    );
    assert_eq!(
        reg.authenticate("dev-1", &secret, Protocol::Http).await,
        Err(Refusal::Disabled)
    );
    assert_eq!(
        reg.identify("dev-1", Protocol::Http),
        Err(Refusal::Disabled)
    );
    reg.set_enabled("dev-1", true).await.unwrap();
    assert_eq!(reg.identify("dev-1", Protocol::Http), Ok(()));
    assert_eq!(
        reg.identify("dev-1", Protocol::Coap),
        Err(Refusal::ProtocolNotAllowed)
    );
    assert_eq!(
        reg.identify("x", Protocol::Coap),
        Err(Refusal::UnknownDevice)
    );
}

/// Timing must not tell which device ids exist: a refusal for an unknown device (or one
/// without a secret) runs one argon2 verification, exactly like a wrong secret.
#[tokio::test]
async fn an_unknown_device_costs_one_argon2_verification_like_a_wrong_secret() {
    let dir = tempfile::tempdir().unwrap();
    let reg = open(dir.path());
    let (_, secret) = reg.create(new_device("dev-1")).await.unwrap();
    reg.register_seen("driver-only", "driver:x").await;
    let cost = |before: u64| reg.verifications() - before;
    let before = reg.verifications();
    assert!(
        reg.authenticate("dev-1", "wrong-secret", Protocol::Mqtt)
            .await
            .is_err()
    );
    assert_eq!(cost(before), 1, "a wrong secret");
    let before = reg.verifications();
    assert_eq!(
        reg.authenticate("nobody", &secret, Protocol::Mqtt).await,
        Err(Refusal::UnknownDevice)
    );
    assert_eq!(cost(before), 1, "an unknown device");
    let before = reg.verifications();
    assert!(
        reg.authenticate("driver-only", &secret, Protocol::Mqtt)
            .await
            .is_err()
    );
    assert_eq!(cost(before), 1, "a device without a secret");
}

/// A rotated secret changes the credential stamp that open connections are checked against.
#[tokio::test]
async fn rotating_a_secret_changes_its_stamp() {
    let dir = tempfile::tempdir().unwrap();
    let reg = open(dir.path());
    reg.create(new_device("dev-1")).await.unwrap();
    let stamp = reg.credential_stamp("dev-1").unwrap();
    reg.update(
        "dev-1",
        serde_json::from_value(serde_json::json!({"name": "renamed"})).unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(
        reg.credential_stamp("dev-1"),
        Some(stamp),
        "other changes keep it"
    );
    reg.rotate_secret("dev-1").await.unwrap();
    assert_ne!(reg.credential_stamp("dev-1"), Some(stamp));
    assert_eq!(reg.credential_stamp("nobody"), None);
}

/// A right secret is recognised by its digest, without argon2: from its creation, after other
/// changes, after a restart; rotation replaces it at once. A secret stored before the digest
/// existed (schema v2) costs one argon2 verification, then its digest is saved for good.
#[tokio::test]
async fn a_right_secret_needs_no_argon2_also_after_a_restart_and_rotation_replaces_it() {
    let dir = tempfile::tempdir().unwrap();
    let reg = open(dir.path());
    let (_, secret) = reg.create(new_device("d")).await.unwrap();
    let runs = |reg: &Registry| reg.verifications();
    let login = |reg: Registry, secret: String| async move {
        reg.authenticate("d", &secret, Protocol::Mqtt).await
    };

    assert_eq!(login(reg.clone(), secret.clone()).await, Ok(()));
    assert_eq!(
        runs(&reg),
        0,
        "a secret generated here is known to be right"
    );
    assert_eq!(
        login(reg.clone(), "wrong".repeat(13)).await,
        Err(Refusal::BadSecret)
    );
    assert_eq!(runs(&reg), 1, "a wrong secret costs one verification");
    reg.update(
        "d",
        DeviceChanges {
            name: Some("renamed".into()),
            ..DeviceChanges::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(login(reg.clone(), secret.clone()).await, Ok(()));
    let (_, new_secret) = reg.rotate_secret("d").await.unwrap();
    assert_eq!(
        login(reg.clone(), secret.clone()).await,
        Err(Refusal::BadSecret),
        "the old secret stops working at once"
    );
    assert_eq!(login(reg.clone(), new_secret.clone()).await, Ok(()));
    assert_eq!(runs(&reg), 2, "only the two refusals ran argon2");
    drop(reg);

    let reg = open(dir.path());
    assert_eq!(login(reg.clone(), new_secret.clone()).await, Ok(()));
    assert_eq!(runs(&reg), 0, "after a restart too");
    drop(reg);

    // A secret from before schema v3: no digest yet.
    let file = dir.path().join(store::FILE_NAME);
    let digest_of_d = || -> Option<String> {
        rusqlite::Connection::open(&file)
            .unwrap()
            .query_row(
                "SELECT secret_digest FROM devices WHERE id = 'd'",
                [],
                |r| r.get(0),
            )
            .unwrap()
    };
    rusqlite::Connection::open(&file)
        .unwrap()
        .execute("UPDATE devices SET secret_digest = NULL", [])
        .unwrap();
    let reg = open(dir.path());
    assert_eq!(login(reg.clone(), new_secret.clone()).await, Ok(()));
    assert_eq!(login(reg.clone(), new_secret.clone()).await, Ok(()));
    assert_eq!(runs(&reg), 1, "verified once, then known");
    let deadline = Instant::now() + Duration::from_secs(5);
    while digest_of_d().is_none() {
        assert!(Instant::now() < deadline, "the digest was never saved");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        digest_of_d().as_deref(),
        Some(secrets::hex(&secrets::sha256(new_secret.as_bytes())).as_str())
    );

    reg.delete("d").await.unwrap();
    assert_eq!(
        login(reg.clone(), new_secret).await,
        Err(Refusal::UnknownDevice)
    );
}

#[tokio::test]
async fn secrets_are_not_stored_in_clear_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let secret = {
        let reg = open(dir.path());
        reg.create(new_device("d")).await.unwrap().1
    };
    let raw = std::fs::read(dir.path().join(store::FILE_NAME)).unwrap();
    let wal = std::fs::read(dir.path().join("registry.db-wal")).unwrap_or_default();
    for bytes in [&raw, &wal] {
        assert!(!bytes.windows(secret.len()).any(|w| w == secret.as_bytes()));
    }
    let reg = open(dir.path());
    reg.authenticate("d", &secret, Protocol::Http)
        .await
        .unwrap();
}

#[tokio::test]
async fn validation_names_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let reg = open(dir.path());
    let field = |e: RegistryError| match e {
        RegistryError::Invalid { field, .. } => field,
        other => panic!("{other}"),
    };
    assert_eq!(
        field(reg.create(new_device("a b")).await.unwrap_err()),
        "id"
    );
    assert_eq!(field(reg.create(new_device("")).await.unwrap_err()), "id");
    assert_eq!(
        field(reg.create(new_device(&"x".repeat(129))).await.unwrap_err()),
        "id"
    );
    let mut d = new_device("ok");
    d.tags = vec!["good".into(), "bad tag".into()];
    assert_eq!(field(reg.create(d).await.unwrap_err()), "tags[1]");
    let mut d = new_device("ok");
    d.name = "x".repeat(257);
    assert_eq!(field(reg.create(d).await.unwrap_err()), "name");
    reg.create(new_device("ok")).await.unwrap();
    assert!(matches!(
        reg.create(new_device("ok")).await.unwrap_err(),
        RegistryError::AlreadyExists { .. }
    ));
    assert!(matches!(
        reg.update("nope", DeviceChanges::default())
            .await
            .unwrap_err(),
        RegistryError::NotFound { .. }
    ));
}

#[tokio::test]
async fn monitoring_counts_persist_across_flush_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let reg = open(dir.path());
        reg.create(new_device("d")).await.unwrap();
        assert_eq!(reg.status("d").unwrap().state, State::Offline);
        reg.observe("d", Traffic::Accepted { bytes: 100 });
        reg.observe("d", Traffic::Accepted { bytes: 50 });
        reg.observe("d", Traffic::Malformed);
        reg.observe("d", Traffic::Signal { rssi: -80.0 });
        reg.observe("d", Traffic::Location { lat: 1.5, lon: 2.5 });
        reg.observe("unknown", Traffic::Accepted { bytes: 1 });
        let s = reg.status("d").unwrap();
        assert_eq!(s.state, State::Online);
        assert_eq!((s.messages, s.bytes, s.errors.malformed), (2, 150, 1));
        assert!(s.messages_per_minute > 1.9);
        assert!(reg.status("unknown").is_none());
        reg.flush().await.unwrap();
        reg.observe("d", Traffic::Refused);
        reg.flush().await.unwrap();
    }
    let reg = open(dir.path());
    let s = reg.status("d").unwrap();
    assert_eq!((s.messages, s.bytes), (2, 150));
    assert_eq!((s.errors.malformed, s.errors.refused), (1, 1));
    assert_eq!(s.signal.unwrap().rssi_dbm, -80.0);
    assert_eq!(s.location.unwrap().lat, 1.5);
    assert!(s.last_seen_ms.is_some());
    assert_eq!(s.state, State::Online, "seen moments ago by the wall clock");
    assert_eq!(s.messages_per_minute, 0.0, "rates are not persisted");
}

#[tokio::test]
async fn state_goes_offline_after_the_threshold() {
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::open(dir.path(), Duration::from_secs(60)).unwrap();
    reg.create(new_device("d")).await.unwrap();
    let t0 = Instant::now();
    let ms = now_unix_ms();
    reg.observe_at("d", Traffic::Accepted { bytes: 1 }, t0, ms);
    let at = |dt: u64| {
        let m = lock(&reg.inner.monitors).get("d").cloned().unwrap();
        m.state(
            true,
            Duration::from_secs(60),
            t0 + Duration::from_secs(dt),
            ms,
        )
    };
    assert_eq!(at(59), State::Online);
    assert_eq!(at(61), State::Offline);
    reg.set_enabled("d", false).await.unwrap();
    assert_eq!(reg.status("d").unwrap().state, State::Disabled);
}

#[tokio::test]
async fn list_pages_in_id_order_with_filters() {
    let dir = tempfile::tempdir().unwrap();
    let reg = open(dir.path());
    for i in 0..25 {
        let mut d = new_device(&format!("dev-{i:02}"));
        if i % 2 == 0 {
            d.tags = vec!["even".into()];
        }
        reg.create(d).await.unwrap();
    }
    reg.set_enabled("dev-03", false).await.unwrap();
    reg.observe("dev-04", Traffic::Accepted { bytes: 1 });

    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let page = reg
            .list(&ListQuery {
                limit: 10,
                cursor: cursor.clone(),
                ..ListQuery::default()
            })
            .unwrap();
        seen.extend(page.devices.iter().map(|d| d.id.clone()));
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    let expected: Vec<String> = (0..25).map(|i| format!("dev-{i:02}")).collect();
    assert_eq!(seen, expected);

    let even = reg
        .list(&ListQuery {
            tag: Some("even".into()),
            limit: 13,
            ..ListQuery::default()
        })
        .unwrap();
    assert_eq!(even.devices.len(), 13);
    assert_eq!(even.next_cursor, None, "exactly one page");

    let state = |s| {
        reg.list(&ListQuery {
            state: Some(s),
            ..ListQuery::default()
        })
        .unwrap()
        .devices
        .into_iter()
        .map(|d| d.id)
        .collect::<Vec<_>>()
    };
    assert_eq!(state(State::Disabled), vec!["dev-03"]);
    assert_eq!(state(State::Online), vec!["dev-04"]);
    assert_eq!(state(State::Offline).len(), 23);
    assert!(matches!(
        reg.list(&ListQuery {
            limit: MAX_PAGE + 1,
            ..ListQuery::default()
        }),
        Err(RegistryError::Invalid { .. })
    ));
}

#[tokio::test]
async fn drivers_register_devices_without_secret_or_protocols() {
    let dir = tempfile::tempdir().unwrap();
    let reg = open(dir.path());
    assert_eq!(
        reg.register_seen("sim-0", "driver:sim").await,
        Admission::Take
    );
    assert_eq!(
        reg.register_seen("sim-0", "driver:sim").await,
        Admission::Take
    );
    assert_eq!(
        reg.register_seen("bad id", "driver:sim").await,
        Admission::Refuse
    );
    assert_eq!(reg.len(), 1);
    let d = reg.get("sim-0").unwrap();
    assert_eq!(d.source, "driver:sim");
    assert!(!d.has_secret);
    assert!(d.protocols.is_empty());
    assert_eq!(d.state, State::Online);
    assert_eq!(
        reg.identify("sim-0", Protocol::Mqtt),
        Err(Refusal::ProtocolNotAllowed)
    );
    assert_eq!(
        reg.authenticate("sim-0", "", Protocol::Mqtt).await,
        Err(Refusal::BadSecret)
    );
    reg.set_enabled("sim-0", false).await.unwrap();
    assert_eq!(
        reg.register_seen("sim-0", "driver:sim").await,
        Admission::Refuse,
        "disabled"
    );
    drop(reg);
    assert_eq!(open(dir.path()).get("sim-0").unwrap().source, "driver:sim");
}

/// `devices.max_automatic`: beyond the cap an unknown device is taken unregistered; configured
/// and API-created devices never count; deleting one makes room; the count survives a reopen.
#[tokio::test]
async fn drivers_register_at_most_max_automatic_devices() {
    let dir = tempfile::tempdir().unwrap();
    let reg = open(dir.path());
    reg.limit_automatic(2);
    reg.register_configured(vec![("plc-1".into(), "driver:modbus".into())])
        .await;
    reg.create(new_device("api-1")).await.unwrap();
    assert_eq!(
        reg.register_seen("auto-1", "driver:z").await,
        Admission::Take
    );
    assert_eq!(
        reg.register_seen("auto-2", "driver:z").await,
        Admission::Take
    );
    assert_eq!(reg.alarm(), None, "nothing left unregistered yet");
    assert_eq!(
        reg.register_seen("auto-3", "driver:z").await,
        Admission::TakeUnregistered
    );
    assert!(reg.get("auto-3").is_none(), "not registered");
    // Known devices, configured ones included, are unaffected by the cap.
    assert_eq!(
        reg.register_seen("auto-1", "driver:z").await,
        Admission::Take
    );
    assert_eq!(
        reg.register_seen("plc-1", "driver:modbus").await,
        Admission::Take
    );
    reg.stored_unregistered("auto-3", 5);
    let alarm = reg
        .alarm()
        .expect("an alarm while readings go unregistered");
    assert!(
        alarm.contains("max_automatic (2)") && alarm.contains("5 reading"),
        "{alarm}"
    );
    let mut metrics = prometheus_client::registry::Registry::default();
    reg.register_metrics(&mut metrics);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &metrics).unwrap();
    assert!(text.contains("outpost_devices_automatic 2"), "{text}");
    assert!(
        text.contains("outpost_devices_unregistered_readings_total 5"),
        "{text}"
    );
    // A deleted automatic device makes room (and clears the alarm).
    reg.delete("auto-1").await.unwrap();
    assert_eq!(reg.alarm(), None);
    assert_eq!(
        reg.register_seen("auto-3", "driver:z").await,
        Admission::Take
    );
    drop(reg);
    // Reopened: two automatic devices counted from the file, the configured one apart.
    let reg = open(dir.path());
    reg.limit_automatic(2);
    reg.register_configured(vec![("plc-1".into(), "driver:modbus".into())])
        .await;
    assert_eq!(
        reg.register_seen("auto-4", "driver:z").await,
        Admission::TakeUnregistered
    );
}

#[tokio::test]
async fn commands_queue_deliver_expire_and_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let reg = open(dir.path());
    reg.create(new_device("d")).await.unwrap();
    assert!(matches!(
        reg.queue_command("nope", &serde_json::json!(1), None)
            .await
            .unwrap_err(),
        RegistryError::NotFound { .. }
    ));
    let c1 = reg
        .queue_command("d", &serde_json::json!({"reboot": true}), None)
        .await
        .unwrap();
    assert_eq!(c1.state, CommandState::Queued);
    let short = reg
        .queue_command(
            "d",
            &serde_json::json!("soon gone"),
            Some(Duration::from_millis(1)),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(
        reg.command("d", short.id).await.unwrap().unwrap().state,
        CommandState::Expired
    );
    let taken = reg.take_pending_commands("d", 10).await.unwrap();
    assert_eq!(taken.len(), 1);
    assert_eq!(taken[0].payload, serde_json::json!({"reboot": true}));
    assert_eq!(taken[0].state, CommandState::Delivered);
    assert!(reg.take_pending_commands("d", 10).await.unwrap().is_empty());
    assert_eq!(
        reg.command("d", c1.id).await.unwrap().unwrap().state,
        CommandState::Delivered
    );
    assert_eq!(reg.command("d", 9999).await.unwrap(), None);

    for i in 0..commands::MAX_QUEUED {
        reg.queue_command("d", &serde_json::json!(i), None)
            .await
            .unwrap();
    }
    assert!(matches!(
        reg.queue_command("d", &serde_json::json!("one too many"), None)
            .await
            .unwrap_err(),
        RegistryError::CommandQueueFull { .. }
    ));
    let pending = reg.pending_commands("d", 5).await.unwrap();
    assert_eq!(pending.len(), 5);
    let ids: Vec<i64> = pending.iter().map(|c| c.id).collect();
    assert_eq!(reg.mark_delivered("d", &ids).await.unwrap(), 5);
    assert_eq!(reg.mark_delivered("d", &ids).await.unwrap(), 0);
    reg.queue_command("d", &serde_json::json!("fits again"), None)
        .await
        .unwrap();
    assert_eq!(reg.commands("d").await.unwrap().len(), 2 + 100 + 1);

    reg.delete("d").await.unwrap();
    assert!(matches!(
        reg.commands("d").await.unwrap_err(),
        RegistryError::NotFound { .. }
    ));
}

#[tokio::test]
async fn corrupt_file_is_quarantined() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join(store::FILE_NAME),
        b"this is not sqlite at all, sorry",
    )
    .unwrap();
    let reg = open(dir.path());
    let q = reg.quarantine().unwrap();
    assert!(q.moved_to.exists());
    assert_eq!(reg.len(), 0);
    reg.create(new_device("d")).await.unwrap();
}

#[tokio::test]
async fn own_mqtt_acl_lists_are_checked_persisted_and_cleared_with_null() {
    let dir = tempfile::tempdir().unwrap();
    let reg = open(dir.path());
    let mut d = new_device("dev-1");
    d.mqtt_publish = Some(vec!["plant/{id}/#".into(), "a/#/b".into()]);
    match reg.create(d).await {
        Err(RegistryError::Invalid { field, .. }) => assert_eq!(field, "mqtt_publish[1]"),
        other => panic!("{other:?}"),
    }
    let mut d = new_device("dev-1");
    d.mqtt_publish = Some(vec!["plant/{id}/#".into()]);
    reg.create(d).await.unwrap();
    let changes: DeviceChanges =
        serde_json::from_str(r#"{"mqtt_subscribe": ["x/{idx}"]}"#).unwrap();
    match reg.update("dev-1", changes).await {
        Err(RegistryError::Invalid { field, .. }) => assert_eq!(field, "mqtt_subscribe[0]"),
        other => panic!("{other:?}"),
    }
    let changes: DeviceChanges =
        serde_json::from_str(r#"{"mqtt_subscribe": ["plant/{id}/cmd/#"]}"#).unwrap();
    reg.update("dev-1", changes).await.unwrap();
    drop(reg);

    // Persisted (schema v2), and `null` goes back to the global lists; absent keeps.
    let reg = open(dir.path());
    let d = reg.get("dev-1").unwrap();
    assert_eq!(d.mqtt_publish, Some(vec!["plant/{id}/#".to_owned()]));
    assert_eq!(d.mqtt_subscribe, Some(vec!["plant/{id}/cmd/#".to_owned()]));
    let changes: DeviceChanges = serde_json::from_str(r#"{"mqtt_publish": null}"#).unwrap();
    let d = reg.update("dev-1", changes).await.unwrap();
    assert_eq!(d.mqtt_publish, None);
    assert_eq!(d.mqtt_subscribe, Some(vec!["plant/{id}/cmd/#".to_owned()]));
}

#[test]
fn a_version_1_registry_is_migrated_and_keeps_its_devices() {
    let dir = tempfile::tempdir().unwrap();
    {
        let conn = rusqlite::Connection::open(dir.path().join(store::FILE_NAME)).unwrap();
        conn.execute_batch(&format!(
            "{}; PRAGMA user_version = 1;
             INSERT INTO devices VALUES ('old', '', '', '', '', '', '[]', 1, 'mqtt', NULL,
                                         'api', 1, 1);",
            store::MIGRATIONS[0]
        ))
        .unwrap();
    }
    let reg = open(dir.path());
    let d = reg.get("old").unwrap();
    assert_eq!((d.mqtt_publish, d.mqtt_subscribe), (None, None));
}

/// Commands from the cloud: queued once per backend id, rejected with a reason, the offset
/// stored with them, every change a status event (none for API commands), an expiry reported
/// once, an acknowledgement recorded once.
#[tokio::test]
async fn cloud_commands_are_queued_once_and_every_change_is_a_status_event() {
    use outpost_sync::forwarder::commands::{Batch, CloudCommand, Payload, Read, Target};
    let dir = tempfile::tempdir().unwrap();
    let reg = open(dir.path());
    reg.create(new_device("d")).await.unwrap();
    let mut off = new_device("off");
    off.enabled = false;
    reg.create(off).await.unwrap();
    let mut silent = new_device("silent");
    silent.protocols = Vec::new();
    reg.create(silent).await.unwrap();
    let far = outpost_sync::outbox::now_unix_ms() + 60_000;
    let command = |id: &str, device: &str, expires_at_ms| {
        Read::Command(CloudCommand {
            id: id.into(),
            target: Target::Device(device.into()),
            name: "open".into(),
            payload: Payload::Bytes(vec![1, 2]),
            expires_at_ms,
            reply_topic: (id == "c-2").then(|| "replies".to_owned()),
            correlation: None,
        })
    };
    assert_eq!(reg.cloud_offset("cmds", 3).unwrap(), None);
    let batch = Batch {
        topic: "cmds".into(),
        partition: 3,
        next_offset: 42,
        reads: vec![
            command("c-1", "d", far),
            command("c-1", "d", far),
            command("c-2", "d", 1),
            command("c-3", "nobody", far),
            command("c-4", "off", far),
            command("c-5", "silent", far),
            Read::Command(CloudCommand {
                target: Target::Gateway,
                ..match command("c-6", "d", far) {
                    Read::Command(c) => c,
                    Read::Invalid { .. } => unreachable!(),
                }
            }),
        ],
    };
    reg.store_cloud_commands(&batch, false).unwrap();
    // Read again (a crash before the consumer moved on): nothing new.
    reg.store_cloud_commands(&batch, false).unwrap();
    assert_eq!(reg.cloud_offset("cmds", 3).unwrap(), Some(42));
    reg.queue_command("d", &serde_json::json!("from the API"), None)
        .await
        .unwrap();
    let queued = reg.commands("d").await.unwrap();
    assert_eq!(queued.len(), 2, "{queued:?}");
    assert_eq!(queued[0].command_id.as_deref(), Some("c-1"));
    assert_eq!(queued[0].payload_base64.as_deref(), Some("AQI="));
    assert_eq!(queued[0].payload_bytes(), vec![1, 2]);

    let taken = reg.take_pending_commands("d", 10).await.unwrap();
    assert_eq!(taken.len(), 2);
    let result = serde_json::json!({"ok": true});
    for _ in 0..2 {
        let acked = reg
            .ack_command("d", taken[0].id, result.clone())
            .await
            .unwrap();
        let commands::Acked::Ok(c) = acked else {
            panic!("{acked:?}");
        };
        assert_eq!(
            (c.state, c.result.as_ref()),
            (CommandState::Acked, Some(&result))
        );
    }
    assert_eq!(
        reg.ack_command("d", 9999, result.clone()).await.unwrap(),
        commands::Acked::NotFound
    );
    assert_eq!(reg.report_expired_commands(true).await.unwrap(), 0);

    let events = reg.status_events(100).await.unwrap();
    let summary: Vec<(String, String, Option<String>)> = events
        .iter()
        .map(|e| {
            let v: serde_json::Value = serde_json::from_str(&e.event).unwrap();
            let reason = v["reason"].as_str().map(str::to_owned);
            (
                v["command_id"].as_str().unwrap().to_owned(),
                v["status"].as_str().unwrap().to_owned(),
                reason,
            )
        })
        .collect();
    let s = |id: &str, status: &str, reason: Option<&str>| {
        (id.to_owned(), status.to_owned(), reason.map(str::to_owned))
    };
    assert_eq!(
        summary,
        vec![
            s("c-1", "queued", None),
            s("c-2", "expired", None),
            s("c-3", "rejected", Some("unknown device \"nobody\"")),
            s("c-4", "rejected", Some("device \"off\" is disabled")),
            s(
                "c-5",
                "rejected",
                Some("protocol not allowed: device \"silent\" may use none of mqtt, coap, http")
            ),
            s(
                "c-6",
                "rejected",
                Some("commands to the gateway itself are off (kafka.commands.gateway = false)")
            ),
            s("c-1", "delivered", None),
            s("c-1", "acked", None),
        ]
    );
    assert_eq!(events[1].reply_topic.as_deref(), Some("replies"));
    assert_eq!(events[6].device_id, "d");
    assert_eq!(reg.delete_status_events(events[3].id).await.unwrap(), 4);
    assert_eq!(reg.status_events(100).await.unwrap().len(), 4);
}
