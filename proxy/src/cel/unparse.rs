//! A parsed CEL expression (`cel.expr.Expr`, as control planes send it in
//! `xds.type.v3.CelExpression`) written back as CEL source, so that it is
//! compiled by the same interpreter as expressions given as text. Every
//! operand of an operator is parenthesised, so precedence cannot change
//! what the tree says.

use crate::config::{join, ConfigError, Result};
use legate_proto::envoy_types::pb::cel::expr::{
    self as ast, constant::ConstantKind, expr::ExprKind,
};

/// The source text of `e`; `path` names `e` in errors.
pub fn source(e: &ast::Expr, path: &str) -> Result<String> {
    let mut out = String::new();
    write(e, path, &mut out)?;
    Ok(out)
}

fn write(e: &ast::Expr, path: &str, out: &mut String) -> Result<()> {
    match &e.expr_kind {
        None => Err(ConfigError::new(path, "an expression with no kind")),
        Some(ExprKind::ConstExpr(c)) => constant(c, &join(path, "const_expr"), out),
        Some(ExprKind::IdentExpr(i)) => {
            out.push_str(&i.name);
            Ok(())
        }
        Some(ExprKind::SelectExpr(s)) => {
            let p = join(path, "select_expr");
            let operand = s
                .operand
                .as_deref()
                .ok_or_else(|| ConfigError::new(join(&p, "operand"), "a select needs an operand"))?;
            if s.test_only {
                out.push_str("has(");
            }
            if !identifier(&s.field) {
                return Err(ConfigError::new(
                    join(&p, "field"),
                    format!("'{}' is not a CEL identifier", s.field),
                ));
            }
            operand_of(operand, &join(&p, "operand"), out)?;
            out.push('.');
            out.push_str(&s.field);
            if s.test_only {
                out.push(')');
            }
            Ok(())
        }
        Some(ExprKind::CallExpr(c)) => call(c, &join(path, "call_expr"), out),
        Some(ExprKind::ListExpr(l)) => {
            out.push('[');
            for (i, x) in l.elements.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write(x, &crate::config::index(&join(path, "list_expr"), "elements", i), out)?;
            }
            out.push(']');
            Ok(())
        }
        Some(ExprKind::StructExpr(s)) => structure(s, &join(path, "struct_expr"), out),
        Some(ExprKind::ComprehensionExpr(_)) => Err(ConfigError::new(
            join(path, "comprehension_expr"),
            "CEL comprehensions (the all/exists/map/filter macros) given as a parsed tree are not supported by Legate; give the expression as cel_expr_string",
        )),
    }
}

/// A name CEL can spell after a dot without quoting.
fn identifier(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// An operand in parentheses unless it binds tighter than any operator
/// (names, constants, selections, indexes, lists, maps, method calls).
fn operand_of(e: &ast::Expr, path: &str, out: &mut String) -> Result<()> {
    let atomic = match &e.expr_kind {
        Some(ExprKind::CallExpr(c)) => {
            c.function == "_[_]" || !c.function.starts_with(['_', '@', '!', '-'])
        }
        // `-1.f()` would read as `-(1.f())`.
        Some(ExprKind::ConstExpr(c)) => {
            !matches!(
                c.constant_kind,
                Some(ConstantKind::Int64Value(i)) if i < 0
            ) && !matches!(
                c.constant_kind,
                Some(ConstantKind::DoubleValue(d)) if d.is_sign_negative()
            )
        }
        Some(_) => true,
        None => false,
    };
    if !atomic {
        out.push('(');
    }
    write(e, path, out)?;
    if !atomic {
        out.push(')');
    }
    Ok(())
}

fn call(c: &ast::expr::Call, path: &str, out: &mut String) -> Result<()> {
    let arg = |i: usize| {
        c.args
            .get(i)
            .map(|a| (a, crate::config::index(path, "args", i)))
            .ok_or_else(|| {
                ConfigError::new(
                    join(path, "args"),
                    format!("'{}' needs more arguments", c.function),
                )
            })
    };
    let infix = match c.function.as_str() {
        "_+_" => Some("+"),
        "_-_" => Some("-"),
        "_*_" => Some("*"),
        "_/_" => Some("/"),
        "_%_" => Some("%"),
        "_==_" => Some("=="),
        "_!=_" => Some("!="),
        "_<_" => Some("<"),
        "_<=_" => Some("<="),
        "_>_" => Some(">"),
        "_>=_" => Some(">="),
        "_&&_" => Some("&&"),
        "_||_" => Some("||"),
        "@in" => Some("in"),
        _ => None,
    };
    // Checkers flatten `a && b && c` into one call of three arguments.
    let variadic = matches!(c.function.as_str(), "_&&_" | "_||_");
    let arity = match c.function.as_str() {
        _ if variadic || c.target.is_some() => None,
        "!_" | "-_" => Some(1),
        "_?_:_" => Some(3),
        _ if infix.is_some() || c.function == "_[_]" => Some(2),
        _ => None,
    };
    let wrong = arity.is_some_and(|n| c.args.len() != n) || (variadic && c.args.len() < 2);
    if wrong {
        return Err(ConfigError::new(
            join(path, "args"),
            format!("'{}' with {} arguments", c.function, c.args.len()),
        ));
    }
    if let (Some(op), None) = (infix, &c.target) {
        for i in 0..c.args.len() {
            if i > 0 {
                out.push_str(&format!(" {op} "));
            }
            let (a, pa) = arg(i)?;
            operand_of(a, &pa, out)?;
        }
        return Ok(());
    }
    match (c.function.as_str(), &c.target) {
        ("!_" | "-_", None) => {
            out.push_str(&c.function[..1]);
            let (a, pa) = arg(0)?;
            operand_of(a, &pa, out)
        }
        ("_?_:_", None) => {
            let ((a, pa), (b, pb), (x, px)) = (arg(0)?, arg(1)?, arg(2)?);
            operand_of(a, &pa, out)?;
            out.push_str(" ? ");
            operand_of(b, &pb, out)?;
            out.push_str(" : ");
            operand_of(x, &px, out)
        }
        ("_[_]", None) => {
            let ((a, pa), (b, pb)) = (arg(0)?, arg(1)?);
            operand_of(a, &pa, out)?;
            out.push('[');
            write(b, &pb, out)?;
            out.push(']');
            Ok(())
        }
        (f, _) if f.starts_with('_') || f.starts_with('@') || f.starts_with('!') => {
            Err(ConfigError::new(
                join(path, "function"),
                format!("CEL operator '{f}' is not supported by Legate"),
            ))
        }
        (f, target) => {
            if let Some(t) = target {
                operand_of(t, &join(path, "target"), out)?;
                out.push('.');
            }
            out.push_str(f);
            out.push('(');
            for i in 0..c.args.len() {
                if i > 0 {
                    out.push_str(", ");
                }
                let (a, pa) = arg(i)?;
                write(a, &pa, out)?;
            }
            out.push(')');
            Ok(())
        }
    }
}

fn structure(s: &ast::expr::CreateStruct, path: &str, out: &mut String) -> Result<()> {
    use ast::expr::create_struct::entry::KeyKind;
    out.push_str(&s.message_name);
    out.push('{');
    for (i, en) in s.entries.iter().enumerate() {
        let p = crate::config::index(path, "entries", i);
        if i > 0 {
            out.push_str(", ");
        }
        match &en.key_kind {
            Some(KeyKind::FieldKey(f)) => out.push_str(f),
            Some(KeyKind::MapKey(k)) => write(k, &join(&p, "map_key"), out)?,
            None => return Err(ConfigError::new(&p, "an entry needs a key")),
        }
        out.push_str(": ");
        let v = en
            .value
            .as_ref()
            .ok_or_else(|| ConfigError::new(join(&p, "value"), "an entry needs a value"))?;
        write(v, &join(&p, "value"), out)?;
    }
    out.push('}');
    Ok(())
}

fn constant(c: &ast::Constant, path: &str, out: &mut String) -> Result<()> {
    match &c.constant_kind {
        Some(ConstantKind::NullValue(_)) => out.push_str("null"),
        Some(ConstantKind::BoolValue(b)) => out.push_str(if *b { "true" } else { "false" }),
        Some(ConstantKind::Int64Value(i)) => {
            // The most negative value has no positive literal to negate.
            if *i == i64::MIN {
                out.push_str("(-9223372036854775807 - 1)");
            } else {
                out.push_str(&i.to_string());
            }
        }
        Some(ConstantKind::Uint64Value(u)) => out.push_str(&format!("{u}u")),
        Some(ConstantKind::DoubleValue(d)) if d.is_finite() => out.push_str(&format!("{d:?}")),
        Some(ConstantKind::StringValue(s)) => quote(s, out),
        Some(ConstantKind::BytesValue(b)) => {
            out.push_str("b\"");
            for byte in b {
                out.push_str(&format!("\\x{byte:02x}"));
            }
            out.push('"');
        }
        _ => {
            return Err(ConfigError::new(
                path,
                "this CEL constant (a non-finite double, or a deprecated duration or timestamp) is not supported by Legate",
            ))
        }
    }
    Ok(())
}

/// A CEL string literal for `s`.
fn quote(s: &str, out: &mut String) {
    out.push('"');
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\u{:04x}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(yaml: &str) -> ast::Expr {
        let v = legate_proto::json::parse_yaml(yaml).unwrap();
        legate_proto::json::to_message(v, "cel.expr.Expr", true).unwrap()
    }

    /// The trees Envoy Gateway sends (its authorization-cel case).
    #[test]
    fn envoy_gateways_trees_print_as_their_source() {
        let starts = parsed(
            r#"
callExpr:
  args: [{constExpr: {stringValue: /admin}, id: "4"}]
  function: startsWith
  target: {id: "2", selectExpr: {field: path, operand: {id: "1", identExpr: {name: request}}}}
id: "3"
"#,
        );
        assert_eq!(
            source(&starts, "e").unwrap(),
            r#"request.path.startsWith("/admin")"#
        );
        let eq = parsed(
            r#"
callExpr:
  function: _==_
  args:
  - {selectExpr: {field: method, operand: {identExpr: {name: request}}}}
  - {constExpr: {stringValue: POST}}
"#,
        );
        assert_eq!(source(&eq, "e").unwrap(), r#"request.method == "POST""#);
    }

    #[test]
    fn operators_keep_the_trees_grouping() {
        // (1 + 2) * 3, which printed without parentheses would be 1 + 6.
        let e = parsed(
            r#"
callExpr:
  function: _*_
  args:
  - callExpr: {function: _+_, args: [{constExpr: {int64Value: 1}}, {constExpr: {int64Value: 2}}]}
  - constExpr: {int64Value: 3}
"#,
        );
        let text = source(&e, "e").unwrap();
        assert_eq!(text, "(1 + 2) * 3");
        let program = cel::Program::compile(&text).unwrap();
        let v = program.execute(&cel::Context::default()).unwrap();
        assert_eq!(v, cel::objects::Value::Int(9));
    }

    #[test]
    fn strings_indexes_has_and_lists() {
        let e = parsed(
            r#"
callExpr:
  function: _&&_
  args:
  - selectExpr: {testOnly: true, field: x, operand: {identExpr: {name: request}}}
  - callExpr:
      function: "@in"
      args:
      - callExpr: {function: "_[_]", args: [{selectExpr: {field: headers, operand: {identExpr: {name: request}}}}, {constExpr: {stringValue: "a\"b"}}]}
      - listExpr: {elements: [{constExpr: {stringValue: "x\ny"}}, {constExpr: {uint64Value: "7"}}]}
"#,
        );
        let text = source(&e, "e").unwrap();
        assert_eq!(
            text,
            r#"has(request.x) && (request.headers["a\"b"] in ["x\ny", 7u])"#
        );
        assert!(cel::Program::compile(&text).is_ok(), "{text}");
    }

    #[test]
    fn flattened_and_is_chained_and_wrong_arity_refused() {
        let e = parsed(
            r#"
callExpr:
  function: _&&_
  args: [{identExpr: {name: a}}, {identExpr: {name: b}}, {identExpr: {name: c}}]
"#,
        );
        assert_eq!(source(&e, "e").unwrap(), "a && b && c");
        let bad = parsed("callExpr: {function: _==_, args: [{identExpr: {name: a}}]}");
        assert_eq!(source(&bad, "e").unwrap_err().path, "e.call_expr.args");
    }

    #[test]
    fn comprehensions_are_refused_naming_the_field() {
        let e = parsed("comprehensionExpr: {iterVar: x}");
        let err = source(&e, "m.expr").unwrap_err();
        assert_eq!(err.path, "m.expr.comprehension_expr");
    }
}
