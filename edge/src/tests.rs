use super::*;

struct Registry;

impl Facts for Registry {
    fn facts(&self, device_id: &str) -> Option<DeviceFacts> {
        (device_id == "boiler-1").then(|| DeviceFacts {
            name: Some("Boiler one".into()),
            model: Some("BX-2".into()),
            location: Some("hall 2".into()),
            firmware: None,
            tags: vec!["boiler".into(), "hall-2".into()],
        })
    }
}

fn engine(toml_text: &str) -> Engine {
    let config: outpost_config::Config = toml::from_str(toml_text).expect("valid TOML config");
    Engine::compile(&config.edge).expect("rules compile")
}

fn reading<'a>(topic: &'a str, payload: &'a [u8], at_ms: u64) -> Reading<'a> {
    Reading {
        device_id: "boiler-1",
        source: "mqtt",
        topic,
        content_type: Some("application/json"),
        payload,
        received_at_ms: at_ms,
    }
}

fn stored(verdict: Verdict) -> Prepared {
    match verdict {
        Verdict::Store(p) => p,
        Verdict::Refuse(i) => panic!("refused: {i:?}"),
    }
}

#[test]
fn transforms_and_enrichment_rewrite_the_payload_in_rule_order() {
    let e = engine(
        r#"
        [[edge.rules]]
        name = "fahrenheit"
        topic = "sensors/#"
        when = "'boiler' in device.tags"
        rename = { temp = "temperature" }
        drop = ["debug"]
        set = { temperature_f = "temp * 9.0 / 5.0 + 32.0" }
        [[edge.rules]]
        name = "facts"
        enrich = ["name", "location", "tags"]
        enrich_into = "payload"
        [[edge.rules]]
        name = "headers"
        enrich = ["model", "firmware"]
        "#,
    );
    let p = stored(e.prepare(
        &reading("sensors/b/t", br#"{"temp":100.0,"debug":"x"}"#, 0),
        &Registry,
    ));
    let out: Value = serde_json::from_slice(&p.payload.unwrap()).unwrap();
    assert_eq!(
        out,
        json!({"temperature": 100.0, "temperature_f": 212.0,
               "device": {"name": "Boiler one", "location": "hall 2", "tags": ["boiler", "hall-2"]}})
    );
    // An unknown fact (firmware) is left out.
    assert_eq!(
        p.headers,
        vec![("outpost-device-model".into(), "BX-2".into())]
    );
    // Another topic: only the catch-all rules run.
    let p = stored(e.prepare(&reading("other", br#"{"temp":1}"#, 0), &Registry));
    assert!(p.trace.iter().all(|t| t.rule != "fahrenheit"));
    // A reading no rule transforms keeps its bytes.
    let e = engine("[[edge.rules]]\nname = \"h\"\nenrich = [\"model\"]\n");
    assert!(
        stored(e.prepare(&reading("x", b"{}", 0), &Registry))
            .payload
            .is_none()
    );
}

/// A rule sees what the rules before it made of the reading, also through the lookups the
/// native evaluator keeps per reading: a field added, changed, renamed or dropped is looked
/// up again.
#[test]
fn later_rules_see_changed_fields() {
    let e = engine(
        r#"
        [[edge.rules]]
        name = "look"
        when = "x > 1.0 && !has(payload.y) && has(payload.old) && n > 1.0"
        [[edge.rules]]
        name = "add"
        set = { y = "x * 2.0" }
        [[edge.rules]]
        name = "change"
        when = "has(payload.y)"
        set = { x = "x * 0.0" }
        rename = { old = "new" }
        drop = ["n"]
        [[edge.rules]]
        name = "after"
        when = "x < 1.0 && y > 9.0 && has(payload.new) && !has(payload.old) && !has(payload.n)"
        set = { ok = "y + 1.0" }
        "#,
    );
    let p = stored(e.prepare(&reading("s", br#"{"x":5.0,"old":1,"n":2.0}"#, 0), &Registry));
    let out: Value = serde_json::from_slice(&p.payload.unwrap()).unwrap();
    assert_eq!(out, json!({"x": 0.0, "y": 10.0, "new": 1, "ok": 11.0}));
}

/// Counters are kept per thread, and summed: readings prepared on more threads at once than
/// there are counting slots, and on threads started after others ended (their slots passed
/// on), are all counted.
#[test]
fn counters_add_up_across_threads() {
    let e = std::sync::Arc::new(engine(
        "[[edge.rules]]\nname = \"all\"\nset = { f = \"double(t) * 2.0\" }\n",
    ));
    let prepare_on_threads = |threads: usize| {
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(threads));
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let (e, barrier) = (std::sync::Arc::clone(&e), std::sync::Arc::clone(&barrier));
                std::thread::spawn(move || {
                    // All alive at once: some find no slot free and share the common shard.
                    barrier.wait();
                    for _ in 0..100 {
                        stored(e.prepare(&reading("s", br#"{"t":1.5}"#, 0), &Registry));
                    }
                    barrier.wait();
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    };
    prepare_on_threads(COUNTING_SLOTS + 8);
    prepare_on_threads(4);
    let (_, stats) = e.rule_stats().next().unwrap();
    let want = 100 * (COUNTING_SLOTS as u64 + 12);
    assert_eq!((stats.matched, stats.transformed), (want, want));
}

#[test]
fn schemas_refuse_or_dead_letter() {
    let e = engine(
        r#"
        [[edge.rules]]
        name = "strict"
        topic = "strict/#"
        schema = { type = "object", required = ["temperature"], properties = { temperature = { type = "number" } } }
        [[edge.rules]]
        name = "lenient"
        topic = "lenient/#"
        schema = { type = "object", required = ["temperature"] }
        on_invalid = "dead_letter"
        "#,
    );
    let Verdict::Refuse(why) = e.prepare(
        &reading("strict/a", br#"{"temperature":"hot"}"#, 0),
        &Registry,
    ) else {
        panic!("not refused")
    };
    assert_eq!(why.rule, "strict");
    assert!(why.error.contains("/temperature"), "{}", why.error);
    stored(e.prepare(&reading("strict/a", br#"{"temperature":20}"#, 0), &Registry));
    let mut text = reading("strict/a", b"hello", 0);
    text.content_type = Some("text/plain");
    assert!(matches!(e.prepare(&text, &Registry), Verdict::Refuse(_)));
    let p = stored(e.prepare(&reading("lenient/a", br#"{"t":1}"#, 0), &Registry));
    assert_eq!(p.invalid.unwrap().rule, "lenient");
    assert!(p.payload.is_none());
}

#[test]
fn alerts_debounce_and_clear_with_hysteresis() {
    let e = engine(
        r#"
        [[edge.rules]]
        name = "overheat"
        [edge.rules.alert]
        raise = "temperature > 80"
        clear = "temperature < 75"
        for_readings = 3
        severity = "critical"
        [edge.rules.alert.command]
        device = "valve-1"
        payload = { action = "close" }
        clear_payload = { action = "open" }
        "#,
    );
    let feed = |t: f64, at: u64| {
        let payload = format!(r#"{{"temperature":{t}}}"#);
        let p = stored(e.prepare(&reading("s", payload.as_bytes(), at), &Registry));
        p.observation.map(|o| e.observe(o)).unwrap_or_default()
    };
    assert_eq!(feed(85.0, 1), Effects::default());
    assert_eq!(feed(85.0, 2), Effects::default());
    assert_eq!(feed(70.0, 3), Effects::default()); // the streak is broken
    feed(81.0, 4);
    feed(82.0, 5);
    let raised = feed(83.0, 6);
    assert_eq!(raised.records.len(), 1);
    let record: Value = serde_json::from_slice(&raised.records[0].payload).unwrap();
    assert_eq!(
        (
            record["state"].as_str(),
            record["severity"].as_str(),
            record["raised_at_ms"].as_u64()
        ),
        (Some("raised"), Some("critical"), Some(6))
    );
    assert_eq!(raised.commands[0].device_id, "valve-1");
    assert_eq!(raised.commands[0].payload, json!({"action": "close"}));
    assert_eq!(e.active_alerts().len(), 1);
    // Between the thresholds nothing changes; below 75 three times clears it.
    assert_eq!(feed(78.0, 7), Effects::default());
    feed(70.0, 8);
    feed(70.0, 9);
    let cleared = feed(70.0, 10);
    let record: Value = serde_json::from_slice(&cleared.records[0].payload).unwrap();
    assert_eq!(record["state"], "cleared");
    assert_eq!(cleared.commands[0].payload, json!({"action": "open"}));
    assert!(e.active_alerts().is_empty());
}

#[test]
fn alert_for_a_duration_and_states_bounded_by_the_cap() {
    let e = engine(
        r#"
        [edge]
        max_alert_keys = 1
        [[edge.rules]]
        name = "hot"
        device = "*"
        [edge.rules.alert]
        raise = "t > 1"
        for = "10s"
        "#,
    );
    let feed = |device: &str, t: u32, at: u64| {
        let payload = format!(r#"{{"t":{t}}}"#);
        let mut r = reading("s", payload.as_bytes(), at);
        r.device_id = device;
        let p = stored(e.prepare(&r, &Registry));
        e.observe(p.observation.unwrap()).records.len()
    };
    assert_eq!(feed("a", 2, 0), 0);
    assert_eq!(feed("a", 2, 9_999), 0);
    assert_eq!(feed("b", 2, 10_000), 0); // over the cap: not tracked
    assert_eq!(e.stats().alert_keys_refused.load(Ordering::Relaxed), 1);
    assert_eq!(feed("a", 2, 10_000), 1);
}

#[test]
fn aggregates_close_on_the_next_window_and_on_tick() {
    let e = engine(
        r#"
        [[edge.rules]]
        name = "minute"
        [edge.rules.aggregate]
        window = "1m"
        fields = ["value", "missing"]
        functions = ["count", "min", "max", "mean", "last"]
        kafka_topic = "agg"
        "#,
    );
    for (i, v) in [1.0, 2.0, 6.0].iter().enumerate() {
        let payload = format!(r#"{{"value":{v}}}"#);
        let p = stored(e.prepare(
            &reading("s", payload.as_bytes(), 60_000 + i as u64),
            &Registry,
        ));
        assert!(e.observe(p.observation.unwrap()).records.is_empty());
    }
    assert!(e.tick(119_999).records.is_empty());
    let effects = e.tick(120_000);
    assert_eq!(effects.records[0].kafka_topic, "agg");
    let record: Value = serde_json::from_slice(&effects.records[0].payload).unwrap();
    assert_eq!(
        record["fields"]["value"],
        json!({"count": 3, "min": 1.0, "max": 6.0, "mean": 3.0, "last": 6.0})
    );
    assert_eq!(
        (
            record["window_start_ms"].as_u64(),
            record["complete"].as_bool()
        ),
        (Some(60_000), Some(true))
    );
    assert!(record["fields"].get("missing").is_none());
    // A clean stop flushes open windows as incomplete.
    let p = stored(e.prepare(&reading("s", br#"{"value":5}"#, 130_000), &Registry));
    e.observe(p.observation.unwrap());
    let flushed: Value = serde_json::from_slice(&e.flush().records[0].payload).unwrap();
    assert_eq!(flushed["complete"], false);
}

#[test]
fn compile_errors_name_their_keys() {
    let config: outpost_config::Config = toml::from_str(
        r#"
        [[edge.rules]]
        name = "a"
        when = "temperature >"
        set = { f = "1 +" }
        schema = { type = 7 }
        [edge.rules.alert]
        raise = "x >>"
        "#,
    )
    .unwrap();
    let problems = Engine::compile(&config.edge).unwrap_err();
    let keys: Vec<&str> = problems.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        [
            "edge.rules[0].when",
            "edge.rules[0].set.f",
            "edge.rules[0].alert.raise",
            "edge.rules[0].schema"
        ]
    );
}

mod fast_path {
    use proptest::prelude::*;
    use serde_json::{Map, Value, json};

    use crate::expr::{Expr, Scope, environment};

    /// Expressions of the native subset and a little beyond it (integer arithmetic, equality,
    /// strings), over fields `a`, `b`, `c` that may be missing.
    fn expression() -> impl Strategy<Value = String> {
        let leaf = prop_oneof![
            Just("a".to_owned()),
            Just("b".to_owned()),
            Just("c".to_owned()),
            Just("payload.a".to_owned()),
            Just("has(payload.b)".to_owned()),
            Just("double(a)".to_owned()),
            (-5i64..5).prop_map(|i| i.to_string()),
            (-5i64..5).prop_map(|i| format!("{i}.5")),
            Just("2u".to_owned()),
            Just("true".to_owned()),
            Just("'x'".to_owned()),
        ];
        leaf.prop_recursive(4, 24, 2, |inner| {
            (inner.clone(), inner, 0..12usize).prop_map(|(l, r, op)| {
                let ops = [
                    "&&", "||", "<", "<=", ">", ">=", "+", "-", "*", "/", "==", "!",
                ];
                match ops[op] {
                    "!" => format!("!({l})"),
                    op => format!("({l}) {op} ({r})"),
                }
            })
        })
    }

    fn field() -> impl Strategy<Value = Option<Value>> {
        prop_oneof![
            Just(None),
            (-3i64..3).prop_map(|i| Some(json!(i))),
            (0u64..3).prop_map(|u| Some(json!(u))),
            (-3.0f64..3.0).prop_map(|d| Some(json!(d))),
            any::<bool>().prop_map(|b| Some(json!(b))),
            Just(Some(json!("text"))),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        /// Wherever the native evaluator answers, the interpreter gives the same value.
        #[test]
        fn fast_path_agrees_with_the_interpreter(
            source in expression(),
            a in field(), b in field(), c in field(),
        ) {
            let env = environment();
            let mut slots = crate::fast::Slots::default();
            let Ok(expr) = Expr::compile_with(&env, &source, &mut slots) else { return Ok(()) };
            // Evaluated twice over one cache: the second answer comes from the cached lookups.
            let cache = crate::fast::cache(slots.len());
            let mut fields = Map::new();
            for (k, v) in [("a", a), ("b", b), ("c", c)] {
                if let Some(v) = v {
                    fields.insert(k.to_owned(), v);
                }
            }
            // The native evaluator reads the members form, the interpreter the tree.
            let text = Value::Object(fields).to_string();
            let decoded = crate::value::decode(None, text.as_bytes());
            let scope = Scope {
                decoded: decoded.as_ref(),
                device: &Value::Null,
                topic: "t",
                source: "mqtt",
                cache: &cache,
            };
            let interpreted = expr.interpret(&env, &scope);
            let first = expr.fast_value(&scope);
            prop_assert_eq!(first, expr.fast_value(&scope), "{}", source);
            if let Some(fast) = first {
                prop_assert_eq!(Ok(fast.to_json()), interpreted, "{}", source);
            }
        }
    }

    proptest! {
        /// Arithmetic chains with literal right sides (`double(t) * 9.0 / 5.0 + 32.0`, one
        /// node natively) give the interpreter's value, step by step in order.
        #[test]
        fn literal_chains_agree_with_the_interpreter(
            t in prop_oneof![(-1e3f64..1e3).prop_map(|d| json!(d)), (-50i64..50).prop_map(|i| json!(i))],
            steps in prop::collection::vec((0..4usize, -8.0f64..8.0), 1..5),
            threshold in -1e3f64..1e3,
        ) {
            let mut source = "double(t)".to_owned();
            for (op, y) in &steps {
                source = format!("({source}) {} {y:?}", ["+", "-", "*", "/"][*op]);
            }
            let env = environment();
            let text = json!({"t": t}).to_string();
            let decoded = crate::value::decode(None, text.as_bytes());
            let scope = Scope {
                decoded: decoded.as_ref(),
                device: &Value::Null,
                topic: "t",
                source: "mqtt",
                cache: &[],
            };
            for source in [source.clone(), format!("{source} > {threshold:?}")] {
                let expr = Expr::compile(&env, &source).unwrap();
                let interpreted = expr.interpret(&env, &scope);
                if let Some(fast) = expr.fast_value(&scope) {
                    prop_assert_eq!(Ok(fast.to_json()), interpreted, "{}", source);
                } else {
                    // Only a division by zero or a result out of range is left to it.
                    prop_assert!(
                        steps.iter().any(|(op, y)| *op == 3 && *y == 0.0)
                            || !matches!(&interpreted, Ok(Value::Number(n)) if n.as_f64().is_some_and(f64::is_finite)),
                        "{} {:?}", source, interpreted
                    );
                }
            }
        }
    }

    #[test]
    fn common_conditions_take_the_native_path() {
        let env = environment();
        let text = json!({"temperature": 85, "humidity": 40.5}).to_string();
        let decoded = crate::value::decode(None, text.as_bytes());
        let scope = Scope {
            decoded: decoded.as_ref(),
            device: &Value::Null,
            topic: "t",
            source: "mqtt",
            cache: &[],
        };
        for source in [
            "temperature > 80 && humidity < 50.0",
            "has(payload.temperature) || humidity >= 1",
            "humidity * 9.0 / 5.0 + 32.0",
            "double(temperature) * 9.0 / 5.0 + 32.0",
            "!(temperature <= 80)",
        ] {
            let expr = Expr::compile(&env, source).unwrap();
            assert!(expr.fast_value(&scope).is_some(), "{source}");
        }
    }
}
