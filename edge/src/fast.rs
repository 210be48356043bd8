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

use std::cell::Cell;

use cel::common::ast::{Expr, LiteralValue};
use cel::parser::Expression;
use serde_json::{Number, Value};

use crate::value::Decoded;

/// What the subset looks up in a reading, numbered per engine ([`Slots`]): a reading looks
/// each up once, however many rules mention it ([`Cache`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    Field,
    PayloadField,
    Has,
}

/// The lookups of every expression of an engine, by slot number.
#[derive(Debug, Default)]
pub struct Slots {
    names: Vec<(Lookup, String)>,
}

impl Slots {
    /// The slot of a lookup (the same one for the same lookup anywhere in the rules).
    pub fn slot(&mut self, lookup: Lookup, name: &str) -> usize {
        match self
            .names
            .iter()
            .position(|(l, n)| *l == lookup && n == name)
        {
            Some(slot) => slot,
            None => {
                self.names.push((lookup, name.to_owned()));
                self.names.len() - 1
            }
        }
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// The slots that look up a field `written` names (any kind of lookup).
    pub fn of(&self, written: impl Fn(&str) -> bool) -> Vec<usize> {
        (0..self.names.len())
            .filter(|&slot| written(&self.names[slot].1))
            .collect()
    }
}

/// Per reading, what each slot gave: `None` until it is looked up, then the subset's value
/// (`Some(None)`: missing, or not a number or boolean). A rule that changes the reading
/// clears the slots of the fields it writes. A slot past its end (an expression compiled on
/// its own) is looked up every time.
pub type Cache = [Cell<Option<Option<Native>>>];

/// A fresh [`Cache`] for `slots` slots.
pub fn cache(slots: usize) -> Vec<Cell<Option<Option<Native>>>> {
    vec![Cell::new(None); slots]
}

fn cached(cache: &Cache, slot: usize, look: impl FnOnce() -> Option<Native>) -> Option<Native> {
    let Some(cell) = cache.get(slot) else {
        return look();
    };
    if let Some(known) = cell.get() {
        return known;
    }
    let value = look();
    cell.set(Some(value));
    value
}

/// A top-level field as a number (an aggregated value), looked up through `cache`.
pub fn number(
    decoded: Option<&Decoded<'_>>,
    name: &str,
    slot: usize,
    cache: &Cache,
) -> Option<f64> {
    match cached(cache, slot, || decoded?.field(name)?)? {
        Native::Int(i) => Some(i as f64),
        Native::UInt(u) => Some(u as f64),
        Native::Double(d) => Some(d),
        Native::Bool(_) => None,
    }
}

/// A compiled expression of the subset.
#[derive(Debug, Clone, PartialEq)]
pub enum Node {
    /// A top-level field by name (never `payload`, `device`, `topic`, `source`), and its slot.
    Field(usize, String),
    /// `payload.<name>`: a member of the payload when it is an object.
    PayloadField(usize, String),
    /// `has(payload.<name>)`.
    Has(usize, String),
    Literal(Native),
    Not(Box<Node>),
    And(Box<Node>, Box<Node>),
    Or(Box<Node>, Box<Node>),
    Compare(Ordering, Box<Node>, Box<Node>),
    /// `Compare` with a literal on the right (`temperature > 80.0`): one node.
    CompareLiteral(Ordering, Box<Node>, Native),
    Arithmetic(Operator, Box<Node>, Box<Node>),
    /// `Arithmetic` nested on its left with a double literal on each right
    /// (`double(t) * 9.0 / 5.0 + 32.0`): the first operand, then each step in turn, as the
    /// nested nodes would compute it — one node instead of one per operator.
    Chain(Box<Node>, Vec<(Operator, f64)>),
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

/// The subset's tree for `expr`, or `None` when it uses anything else. Its lookups get their
/// slots from `slots`.
pub fn compile(expr: &Expression, slots: &mut Slots) -> Option<Node> {
    match &expr.expr {
        Expr::Ident(name) if !RESERVED.contains(&name.as_str()) => {
            Some(Node::Field(slots.slot(Lookup::Field, name), name.clone()))
        }
        Expr::Literal(LiteralValue::Int(i)) => Some(Node::Literal(Native::Int(*i.inner()))),
        Expr::Literal(LiteralValue::UInt(u)) => Some(Node::Literal(Native::UInt(*u.inner()))),
        Expr::Literal(LiteralValue::Double(d)) => Some(Node::Literal(Native::Double(*d.inner()))),
        Expr::Literal(LiteralValue::Boolean(b)) => Some(Node::Literal(Native::Bool(*b.inner()))),
        Expr::Select(select) => match &select.operand.expr {
            Expr::Ident(operand) if operand == "payload" => Some(if select.test {
                Node::Has(slots.slot(Lookup::Has, &select.field), select.field.clone())
            } else {
                let slot = slots.slot(Lookup::PayloadField, &select.field);
                Node::PayloadField(slot, select.field.clone())
            }),
            _ => None,
        },
        Expr::Call(call) if call.target.is_none() => {
            let mut arg = |i: usize| {
                call.args
                    .get(i)
                    .and_then(|a| compile(a, slots))
                    .map(Box::new)
            };
            let two = |arg: &mut dyn FnMut(usize) -> Option<Box<Node>>| {
                Some((arg(0)?, arg(1)?)).filter(|_| call.args.len() == 2)
            };
            match call.func_name.as_str() {
                "_&&_" => two(&mut arg).map(|(a, b)| Node::And(a, b)),
                "_||_" => two(&mut arg).map(|(a, b)| Node::Or(a, b)),
                "!_" if call.args.len() == 1 => arg(0).map(Node::Not),
                "-_" if call.args.len() == 1 => arg(0).map(Node::Negate),
                "double" if call.args.len() == 1 => arg(0).map(Node::Double),
                "_<_" => two(&mut arg).map(|(a, b)| compare(Ordering::Less, *a, *b)),
                "_<=_" => two(&mut arg).map(|(a, b)| compare(Ordering::LessEqual, *a, *b)),
                "_>_" => two(&mut arg).map(|(a, b)| compare(Ordering::Greater, *a, *b)),
                "_>=_" => two(&mut arg).map(|(a, b)| compare(Ordering::GreaterEqual, *a, *b)),
                "_+_" => two(&mut arg).map(|(a, b)| arithmetic(Operator::Add, *a, *b)),
                "_-_" => two(&mut arg).map(|(a, b)| arithmetic(Operator::Subtract, *a, *b)),
                "_*_" => two(&mut arg).map(|(a, b)| arithmetic(Operator::Multiply, *a, *b)),
                "_/_" => two(&mut arg).map(|(a, b)| arithmetic(Operator::Divide, *a, *b)),
                _ => None,
            }
        }
        _ => None,
    }
}

/// A comparison, with a literal right side folded into the node.
fn compare(op: Ordering, a: Node, b: Node) -> Node {
    match b {
        Node::Literal(n) => Node::CompareLiteral(op, Box::new(a), n),
        b => Node::Compare(op, Box::new(a), Box::new(b)),
    }
}

/// An arithmetic node, folded into a [`Node::Chain`] when its right side is a double literal.
fn arithmetic(op: Operator, a: Node, b: Node) -> Node {
    match (a, b) {
        (Node::Chain(first, mut steps), Node::Literal(Native::Double(y))) => {
            steps.push((op, y));
            Node::Chain(first, steps)
        }
        (a, Node::Literal(Native::Double(y))) => Node::Chain(Box::new(a), vec![(op, y)]),
        (a, b) => Node::Arithmetic(op, Box::new(a), Box::new(b)),
    }
}

/// CEL's double arithmetic, when the subset can tell it: `None` for a division by zero or a
/// result that is not finite (the interpreter's error or value).
fn apply(op: Operator, x: f64, y: f64) -> Option<f64> {
    let r = match op {
        Operator::Add => x + y,
        Operator::Subtract => x - y,
        Operator::Multiply => x * y,
        Operator::Divide if y != 0.0 => x / y,
        Operator::Divide => return None,
    };
    r.is_finite().then_some(r)
}

/// `double(n)` of a number.
fn double(n: Native) -> Option<Native> {
    match n {
        Native::Int(i) => Some(Native::Double(i as f64)),
        Native::UInt(u) => Some(Native::Double(u as f64)),
        Native::Double(d) => Some(Native::Double(d)),
        Native::Bool(_) => None,
    }
}

/// `a op b` as a boolean.
fn compared(op: Ordering, a: Native, b: Native) -> Option<Native> {
    let o = order(a, b)?;
    Some(Native::Bool(match op {
        Ordering::Less => o.is_lt(),
        Ordering::LessEqual => o.is_le(),
        Ordering::Greater => o.is_gt(),
        Ordering::GreaterEqual => o.is_ge(),
    }))
}

impl Native {
    pub(crate) fn of(value: &Value) -> Option<Native> {
        match value {
            Value::Bool(b) => Some(Native::Bool(*b)),
            Value::Number(n) => Native::of_number(n),
            _ => None,
        }
    }

    /// A JSON number as CEL types it.
    pub(crate) fn of_number(n: &Number) -> Option<Native> {
        if let Some(u) = n.as_u64() {
            Some(Native::UInt(u))
        } else if let Some(i) = n.as_i64() {
            Some(Native::Int(i))
        } else {
            n.as_f64().map(Native::Double)
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
    /// The value, when the subset can tell it for the reading `decoded` (`None`: not
    /// structured); lookups go through `cache`.
    pub fn eval(&self, decoded: Option<&Decoded<'_>>, cache: &Cache) -> Option<Native> {
        // Operands that are fields or literals (most of them) are read here, not by a call.
        let field = |slot: usize, name: &str| cached(cache, slot, || decoded?.field(name)?);
        let eval = |node: &Node| match node {
            Node::Literal(n) => Some(*n),
            Node::Field(slot, name) => field(*slot, name),
            Node::CompareLiteral(op, a, b) => match &**a {
                Node::Field(slot, name) => compared(*op, field(*slot, name)?, *b),
                _ => node.eval(decoded, cache),
            },
            Node::Double(a) => match &**a {
                Node::Field(slot, name) => double(field(*slot, name)?),
                _ => node.eval(decoded, cache),
            },
            other => other.eval(decoded, cache),
        };
        match self {
            Node::Field(slot, name) => cached(cache, *slot, || decoded?.field(name)?),
            Node::PayloadField(slot, name) => cached(cache, *slot, || decoded?.member(name)?),
            Node::Has(slot, name) => {
                cached(cache, *slot, || Some(Native::Bool(decoded?.has(name)?)))
            }
            Node::Literal(n) => Some(*n),
            Node::Not(a) => Some(Native::Bool(!eval(a)?.as_bool()?)),
            // Both sides must be booleans the subset can tell, except that a false (true) left
            // side decides `&&` (`||`) whatever the right side is — as in CEL.
            Node::And(a, b) => match eval(a)?.as_bool()? {
                false => Some(Native::Bool(false)),
                true => Some(Native::Bool(eval(b)?.as_bool()?)),
            },
            Node::Or(a, b) => match eval(a)?.as_bool()? {
                true => Some(Native::Bool(true)),
                false => Some(Native::Bool(eval(b)?.as_bool()?)),
            },
            Node::Compare(op, a, b) => compared(*op, eval(a)?, eval(b)?),
            Node::CompareLiteral(op, a, b) => compared(*op, eval(a)?, *b),
            // Doubles only: integer arithmetic (overflow, truncating division) and mixed types
            // (an error in CEL) go to the interpreter.
            Node::Arithmetic(op, a, b) => {
                let (Native::Double(x), Native::Double(y)) = (eval(a)?, eval(b)?) else {
                    return None;
                };
                apply(*op, x, y).map(Native::Double)
            }
            Node::Chain(first, steps) => {
                let Native::Double(mut x) = eval(first)? else {
                    return None;
                };
                for &(op, y) in steps {
                    x = apply(op, x, y)?;
                }
                Some(Native::Double(x))
            }
            Node::Double(a) => double(eval(a)?),
            Node::Negate(a) => match eval(a)? {
                Native::Double(d) => Some(Native::Double(-d)),
                Native::Int(i) => i.checked_neg().map(Native::Int),
                _ => None,
            },
        }
    }
}
