//! A native evaluator for the part of CEL most edge conditions use: numeric and boolean fields,
//! number literals, comparisons, `&&`, `||`, `!`, double arithmetic, `double(x)` and
//! `has(payload.x)`.
//!
//! It is not a language of its own: it walks the AST the `cel` crate parsed, and answers only
//! when the answer is certain to be the interpreter's. Anything else — a missing field, a type
//! the subset does not cover, integer arithmetic, a division by zero, a NaN — returns `None`,
//! and the caller asks the interpreter, which gives the value or the error. The interpreter
//! costs about a microsecond per evaluation (a context, the variables converted, the tree
//! walked through trait objects); this path costs tens of nanoseconds, which is what lets 20
//! rules run on every reading (docs/BENCHMARKS.md, "Edge rules"). A differential property test
//! (`fast_path_agrees_with_the_interpreter`) holds the two together.

use cel::common::ast::{Expr, LiteralValue};
use cel::parser::Expression;
use serde_json::{Map, Value};

/// A compiled expression of the subset.
#[derive(Debug, Clone, PartialEq)]
pub enum Node {
    /// A top-level field by name (never `payload`, `device`, `topic`, `source`).
    Field(String),
    /// `payload.<name>`: a member of the payload when it is an object.
    PayloadField(String),
    /// `has(payload.<name>)`.
    Has(String),
    Literal(Native),
    Not(Box<Node>),
    And(Box<Node>, Box<Node>),
    Or(Box<Node>, Box<Node>),
    Compare(Ordering, Box<Node>, Box<Node>),
    Arithmetic(Operator, Box<Node>, Box<Node>),
    Negate(Box<Node>),
    /// `double(x)` of a number.
    Double(Box<Node>),
}

/// A value of the subset, typed as CEL types JSON values (`cel::to_value`): a non-negative
/// JSON integer is a `uint`, a negative one an `int`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Native {
    Int(i64),
    UInt(u64),
    Double(f64),
    Bool(bool),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ordering {
    Less,
    LessEqual,
    Greater,
    GreaterEqual,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operator {
    Add,
    Subtract,
    Multiply,
    Divide,
}

/// Names that are never fields.
const RESERVED: &[&str] = &["payload", "device", "topic", "source"];

/// The subset's tree for `expr`, or `None` when it uses anything else.
pub fn compile(expr: &Expression) -> Option<Node> {
    match &expr.expr {
        Expr::Ident(name) if !RESERVED.contains(&name.as_str()) => Some(Node::Field(name.clone())),
        Expr::Literal(LiteralValue::Int(i)) => Some(Node::Literal(Native::Int(*i.inner()))),
        Expr::Literal(LiteralValue::UInt(u)) => Some(Node::Literal(Native::UInt(*u.inner()))),
        Expr::Literal(LiteralValue::Double(d)) => Some(Node::Literal(Native::Double(*d.inner()))),
        Expr::Literal(LiteralValue::Boolean(b)) => Some(Node::Literal(Native::Bool(*b.inner()))),
        Expr::Select(select) => match &select.operand.expr {
            Expr::Ident(operand) if operand == "payload" => Some(if select.test {
                Node::Has(select.field.clone())
            } else {
                Node::PayloadField(select.field.clone())
            }),
            _ => None,
        },
        Expr::Call(call) if call.target.is_none() => {
            let arg = |i: usize| call.args.get(i).and_then(compile).map(Box::new);
            let two = || Some((arg(0)?, arg(1)?)).filter(|_| call.args.len() == 2);
            match call.func_name.as_str() {
                "_&&_" => two().map(|(a, b)| Node::And(a, b)),
                "_||_" => two().map(|(a, b)| Node::Or(a, b)),
                "!_" if call.args.len() == 1 => arg(0).map(Node::Not),
                "-_" if call.args.len() == 1 => arg(0).map(Node::Negate),
                "double" if call.args.len() == 1 => arg(0).map(Node::Double),
                "_<_" => two().map(|(a, b)| Node::Compare(Ordering::Less, a, b)),
                "_<=_" => two().map(|(a, b)| Node::Compare(Ordering::LessEqual, a, b)),
                "_>_" => two().map(|(a, b)| Node::Compare(Ordering::Greater, a, b)),
                "_>=_" => two().map(|(a, b)| Node::Compare(Ordering::GreaterEqual, a, b)),
                "_+_" => two().map(|(a, b)| Node::Arithmetic(Operator::Add, a, b)),
                "_-_" => two().map(|(a, b)| Node::Arithmetic(Operator::Subtract, a, b)),
                "_*_" => two().map(|(a, b)| Node::Arithmetic(Operator::Multiply, a, b)),
                "_/_" => two().map(|(a, b)| Node::Arithmetic(Operator::Divide, a, b)),
                _ => None,
            }
        }
        _ => None,
    }
}

impl Native {
    fn of(value: &Value) -> Option<Native> {
        match value {
            Value::Bool(b) => Some(Native::Bool(*b)),
            Value::Number(n) => {
                if let Some(u) = n.as_u64() {
                    Some(Native::UInt(u))
                } else if let Some(i) = n.as_i64() {
                    Some(Native::Int(i))
                } else {
                    n.as_f64().map(Native::Double)
                }
            }
            _ => None,
        }
    }

    /// As JSON (what the interpreter's result converts to).
    pub fn to_json(self) -> Value {
        match self {
            Native::Int(i) => Value::from(i),
            Native::UInt(u) => Value::from(u),
            Native::Double(d) => serde_json::Number::from_f64(d).map_or(Value::Null, Value::Number),
            Native::Bool(b) => Value::Bool(b),
        }
    }

    fn as_bool(self) -> Option<bool> {
        match self {
            Native::Bool(b) => Some(b),
            _ => None,
        }
    }
}

/// CEL's ordering of two numbers: integers exactly, anything with a double as doubles (a NaN
/// is the interpreter's error, so `None`).
fn order(a: Native, b: Native) -> Option<std::cmp::Ordering> {
    let int = |n: Native| match n {
        Native::Int(i) => Some(i128::from(i)),
        Native::UInt(u) => Some(i128::from(u)),
        _ => None,
    };
    let float = |n: Native| match n {
        Native::Int(i) => Some(i as f64),
        Native::UInt(u) => Some(u as f64),
        Native::Double(d) => Some(d),
        Native::Bool(_) => None,
    };
    match (int(a), int(b)) {
        (Some(x), Some(y)) => Some(x.cmp(&y)),
        _ => float(a)?.partial_cmp(&float(b)?),
    }
}

impl Node {
    /// The value, when the subset can tell it for this reading.
    pub fn eval(&self, fields: &Map<String, Value>, payload: &Value) -> Option<Native> {
        match self {
            Node::Field(name) => Native::of(fields.get(name)?),
            Node::PayloadField(name) => Native::of(payload.as_object()?.get(name)?),
            Node::Has(name) => Some(Native::Bool(payload.as_object()?.contains_key(name))),
            Node::Literal(n) => Some(*n),
            Node::Not(a) => Some(Native::Bool(!a.eval(fields, payload)?.as_bool()?)),
            // Both sides must be booleans the subset can tell, except that a false (true) left
            // side decides `&&` (`||`) whatever the right side is — as in CEL.
            Node::And(a, b) => match a.eval(fields, payload)?.as_bool()? {
                false => Some(Native::Bool(false)),
                true => Some(Native::Bool(b.eval(fields, payload)?.as_bool()?)),
            },
            Node::Or(a, b) => match a.eval(fields, payload)?.as_bool()? {
                true => Some(Native::Bool(true)),
                false => Some(Native::Bool(b.eval(fields, payload)?.as_bool()?)),
            },
            Node::Compare(op, a, b) => {
                let o = order(a.eval(fields, payload)?, b.eval(fields, payload)?)?;
                let result = match op {
                    Ordering::Less => o.is_lt(),
                    Ordering::LessEqual => o.is_le(),
                    Ordering::Greater => o.is_gt(),
                    Ordering::GreaterEqual => o.is_ge(),
                };
                Some(Native::Bool(result))
            }
            // Doubles only: integer arithmetic (overflow, truncating division) and mixed types
            // (an error in CEL) go to the interpreter.
            Node::Arithmetic(op, a, b) => {
                let (Native::Double(x), Native::Double(y)) =
                    (a.eval(fields, payload)?, b.eval(fields, payload)?)
                else {
                    return None;
                };
                let r = match op {
                    Operator::Add => x + y,
                    Operator::Subtract => x - y,
                    Operator::Multiply => x * y,
                    Operator::Divide if y != 0.0 => x / y,
                    Operator::Divide => return None,
                };
                r.is_finite().then_some(Native::Double(r))
            }
            Node::Double(a) => match a.eval(fields, payload)? {
                Native::Int(i) => Some(Native::Double(i as f64)),
                Native::UInt(u) => Some(Native::Double(u as f64)),
                Native::Double(d) => Some(Native::Double(d)),
                Native::Bool(_) => None,
            },
            Node::Negate(a) => match a.eval(fields, payload)? {
                Native::Double(d) => Some(Native::Double(-d)),
                Native::Int(i) => i.checked_neg().map(Native::Int),
                _ => None,
            },
        }
    }
}
