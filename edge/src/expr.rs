//! CEL expressions over a reading (ARCHITECTURE.md, "Decision: CEL for edge rules").
//!
//! An expression sees the reading's top-level fields by name (`temperature > 80`), and
//! `payload` (the whole decoded payload), `device` (`id`, `name`, `model`, `location`, `tags`,
//! `firmware` from the registry), `topic` and `source`. A field named like one of those is
//! reached through `payload.<name>`. Compiled once; per evaluation only the variables the
//! expression mentions are bound.

use std::sync::Arc;

use serde_json::{Map, Value};

use crate::value::{Decoded, NO_FIELDS};

/// What an expression can see of a reading.
#[derive(Debug, Clone, Copy)]
pub struct Scope<'a> {
    /// The payload, decoded (`None`: not structured, no fields).
    pub decoded: Option<&'a Decoded<'a>>,
    pub device: &'a Value,
    pub topic: &'a str,
    pub source: &'a str,
    /// The reading's lookups so far (`&[]`: none cached).
    pub cache: &'a crate::fast::Cache,
}

impl Scope<'_> {
    /// The reading's fields by name, for the interpreter (a members-form payload's tree is
    /// built here, once).
    pub fn fields(&self) -> &Map<String, Value> {
        self.decoded.map_or(&*NO_FIELDS, Decoded::fields)
    }

    /// The whole payload (`null` when not structured).
    pub fn payload(&self) -> &Value {
        const NULL: &Value = &Value::Null;
        self.decoded.map_or(NULL, Decoded::value)
    }
}

/// A compiled expression.
pub struct Expr {
    source: String,
    program: cel::Program,
    /// The same expression for the native evaluator, when it is in its subset.
    fast: Option<crate::fast::Node>,
    /// The variables it mentions (bound per evaluation).
    variables: Vec<String>,
}

impl std::fmt::Debug for Expr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Expr").field(&self.source).finish()
    }
}

/// The standard library, shared by every evaluation.
pub fn environment() -> Arc<cel::Env> {
    Arc::new(cel::Env::stdlib())
}

impl Expr {
    /// Compiles `source`; the error is the parser's message.
    pub fn compile(env: &cel::Env, source: &str) -> Result<Self, String> {
        Self::compile_with(env, source, &mut crate::fast::Slots::default())
    }

    /// [`Expr::compile`], numbering its lookups in the engine's `slots`.
    pub(crate) fn compile_with(
        env: &cel::Env,
        source: &str,
        slots: &mut crate::fast::Slots,
    ) -> Result<Self, String> {
        let program = env.compile(source).map_err(|e| {
            let text = e.to_string();
            format!("invalid CEL expression: {}", text.trim())
        })?;
        let variables = program
            .references()
            .variables()
            .into_iter()
            .map(str::to_owned)
            .collect();
        Ok(Self {
            source: source.to_owned(),
            fast: crate::fast::compile(program.expression(), slots),
            program,
            variables,
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Evaluates to a JSON value. A field the reading lacks is an error (`no such key` /
    /// `undeclared reference`), as is a type mismatch: the caller decides what an error means.
    pub fn eval(&self, env: &Arc<cel::Env>, scope: &Scope<'_>) -> Result<Value, String> {
        if let Some(value) = self.fast_value(scope) {
            return Ok(value.to_json());
        }
        self.interpret(env, scope)
    }

    /// The native evaluator's answer, when it has one.
    pub(crate) fn fast_value(&self, scope: &Scope<'_>) -> Option<crate::fast::Native> {
        self.fast.as_ref()?.eval(scope.decoded, scope.cache)
    }

    /// Whether the expression mentions `name` (`device`: the registry's facts are needed).
    pub fn mentions(&self, name: &str) -> bool {
        self.variables.iter().any(|v| v == name)
    }

    /// [`Expr::eval`] by the interpreter alone.
    pub fn interpret(&self, env: &Arc<cel::Env>, scope: &Scope<'_>) -> Result<Value, String> {
        let mut ctx = cel::Context::with_env(Arc::clone(env));
        for name in &self.variables {
            let value = match name.as_str() {
                "payload" => scope.payload(),
                "device" => scope.device,
                "topic" => {
                    ctx.add_variable_from_value(name.as_str(), scope.topic);
                    continue;
                }
                "source" => {
                    ctx.add_variable_from_value(name.as_str(), scope.source);
                    continue;
                }
                field => match scope.fields().get(field) {
                    Some(v) => v,
                    None => continue,
                },
            };
            let value = cel::to_value(value).map_err(|e| e.to_string())?;
            ctx.add_variable_from_value(name.as_str(), value);
        }
        let result = self.program.execute(&ctx).map_err(|e| e.to_string())?;
        result.json().map_err(|e| e.to_string())
    }

    /// Evaluates a condition: `Ok(bool)` for a boolean result, an error otherwise.
    pub fn test(&self, env: &Arc<cel::Env>, scope: &Scope<'_>) -> Result<bool, String> {
        if let Some(crate::fast::Native::Bool(b)) = self.fast_value(scope) {
            return Ok(b);
        }
        match self.interpret(env, scope)? {
            Value::Bool(b) => Ok(b),
            other => Err(format!("the condition gave {other}, not true or false")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn eval(source: &str, payload: Value) -> Result<Value, String> {
        let env = environment();
        let expr = Expr::compile(&env, source)?;
        let text = payload.to_string();
        let decoded = crate::value::decode(Some("application/json"), text.as_bytes());
        let device = json!({"id": "boiler-1", "tags": ["boiler", "hall-2"], "name": "Boiler"});
        expr.eval(
            &env,
            &Scope {
                decoded: decoded.as_ref(),
                device: &device,
                topic: "sensors/boiler-1/temp",
                source: "mqtt",
                cache: &[],
            },
        )
    }

    #[test]
    fn conditions_see_fields_device_topic_and_source() {
        let p = json!({"temperature": 85.5, "unit": "C", "n": 3});
        let t = |s: &str| eval(s, p.clone());
        assert_eq!(t("temperature > 80"), Ok(json!(true)));
        // Integers and doubles compare with each other.
        assert_eq!(t("n > 2.5 && temperature > 80"), Ok(json!(true)));
        assert_eq!(
            t("'boiler' in device.tags && device.id == 'boiler-1'"),
            Ok(json!(true))
        );
        assert_eq!(
            t("topic.startsWith('sensors/') && source == 'mqtt'"),
            Ok(json!(true))
        );
        assert_eq!(
            t("has(payload.unit) && !has(payload.humidity)"),
            Ok(json!(true))
        );
        assert_eq!(
            t("(temperature - 32.0) * 5.0 / 9.0 > 29.0"),
            Ok(json!(true))
        );
        // A missing field is an error, not false: the caller counts it.
        assert!(t("humidity > 50").is_err());
        assert!(
            eval("temperature >", json!({}))
                .unwrap_err()
                .contains("invalid CEL")
        );
    }
}
