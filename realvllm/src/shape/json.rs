//! JSON answers compared by shape: key sets and JSON types at every path, and error
//! answers by status, shape and the `type`/`param`/`code` values.

use serde_json::Value;

use super::{diff, known, Difference, KnownDifference};

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Compares two JSON values by shape only: object key sets and the JSON type at every
/// path (null, bool, number — integer or float —, string, array, object), never values.
/// Arrays of equal length are compared element by element, otherwise every element
/// against the other side's first; an empty array matches any array. Paths a known
/// difference in `ignored` covers are skipped.
pub fn json_shape_diff(path: &str, sim: &Value, real: &Value, ignored: &[KnownDifference]) -> Vec<Difference> {
    let mut out = Vec::new();
    shape(path, sim, real, ignored, &mut out);
    out.sort();
    out.dedup();
    out
}

fn shape(path: &str, sim: &Value, real: &Value, ignored: &[KnownDifference], out: &mut Vec<Difference>) {
    if known(path, ignored).is_some() {
        return;
    }
    match (sim, real) {
        (Value::Object(s), Value::Object(r)) => {
            for (k, sv) in s {
                let p = format!("{path}.{k}");
                match r.get(k) {
                    Some(rv) => shape(&p, sv, rv, ignored, out),
                    None if known(&p, ignored).is_none() => {
                        out.push(diff(p, format!("sim has this key ({}), real vLLM does not", json_type(sv))))
                    }
                    None => {}
                }
            }
            for (k, rv) in r {
                let p = format!("{path}.{k}");
                if !s.contains_key(k) && known(&p, ignored).is_none() {
                    out.push(diff(p, format!("real vLLM has this key ({}), sim does not", json_type(rv))));
                }
            }
        }
        (Value::Array(s), Value::Array(r)) => {
            let p = format!("{path}[]");
            if s.is_empty() || r.is_empty() {
                return;
            }
            if s.len() == r.len() {
                for (sv, rv) in s.iter().zip(r) {
                    shape(&p, sv, rv, ignored, out);
                }
            } else {
                for sv in s {
                    shape(&p, sv, &r[0], ignored, out);
                }
                for rv in &r[1..] {
                    shape(&p, &s[0], rv, ignored, out);
                }
            }
        }
        _ if json_type(sim) != json_type(real) => out.push(diff(
            path,
            format!("sim has {} ({}), real vLLM has {} ({})", json_type(sim), brief(sim), json_type(real), brief(real)),
        )),
        _ => {}
    }
}

/// A value for a message, cut short.
fn brief(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 40 {
        format!("{}...", s.chars().take(40).collect::<String>())
    } else {
        s
    }
}

/// Compares two error answers: the status, the body's JSON shape, and the values of
/// `error.type`, `error.param` and `error.code` (messages are not compared: they name
/// values); the sim's `error.code` must also equal its status. A body that is not JSON
/// must be so on both sides.
pub fn error_diff(status_sim: u16, body_sim: &str, status_real: u16, body_real: &str) -> Vec<Difference> {
    let mut out = Vec::new();
    if status_sim != status_real {
        out.push(diff("status", format!("sim answers {status_sim}, real vLLM {status_real}")));
    }
    let parsed = (serde_json::from_str::<Value>(body_sim), serde_json::from_str::<Value>(body_real));
    match parsed {
        (Ok(s), Ok(r)) => {
            out.extend(json_shape_diff("$", &s, &r, &[]));
            for key in ["type", "param", "code"] {
                let (sv, rv) = (s.pointer(&format!("/error/{key}")), r.pointer(&format!("/error/{key}")));
                if sv != rv {
                    let show = |v: Option<&Value>| v.map_or("nothing".to_string(), Value::to_string);
                    out.push(diff(format!("$.error.{key}"), format!("sim says {}, real vLLM {}", show(sv), show(rv))));
                }
            }
            if let Some(code) = s.pointer("/error/code").and_then(Value::as_u64) {
                if code != u64::from(status_sim) {
                    out.push(diff("$.error.code", format!("sim's code {code} is not its status {status_sim}")));
                }
            }
        }
        (Err(_), Ok(_)) => out.push(diff("$", format!("sim's body is not JSON: {body_sim:.80}"))),
        (Ok(_), Err(_)) => out.push(diff("$", format!("sim's body is JSON, real vLLM's is text: {body_real:.80}"))),
        (Err(_), Err(_)) => {}
    }
    out.sort();
    out.dedup_by(|a, b| a.path == b.path);
    out
}
