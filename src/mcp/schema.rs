//! MCP input schemas made acceptable to strict providers: local `$ref`s
//! inlined, meta keys dropped, nullable unions collapsed, objects given
//! `properties`, `required` limited to properties that exist.
//!
//! Inlining is bounded in size, not only in depth: definitions that refer
//! to each other several times grow exponentially when inlined, so the
//! work stops as soon as the output would pass [`MAX_SCHEMA_BYTES`].

use serde_json::{Map, Value, json};

/// How deep `$ref`s are followed before a recursive one is cut off.
const MAX_REF_DEPTH: usize = 8;
/// The largest schema accepted from a server, and the largest one sent to
/// the model after inlining (in bytes of JSON, roughly).
pub const MAX_SCHEMA_BYTES: usize = 64 * 1024;

/// Why a schema could not be normalised.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchemaError {
    #[error("its input schema is not a JSON object")]
    NotAnObject,
    #[error("its input schema is larger than {} KiB", MAX_SCHEMA_BYTES / 1024)]
    TooLarge,
    #[error("its input schema grows past {} KiB once its $refs are inlined", MAX_SCHEMA_BYTES / 1024)]
    ExpandsTooMuch,
}

/// The schema offered for a tool whose own schema cannot be used: any object.
pub fn open_object() -> Value {
    json!({"type": "object", "properties": {}})
}

/// A normalised copy of `schema`, always an object schema at the root.
pub fn normalise(schema: &Value) -> Result<Value, SchemaError> {
    if !schema.is_object() {
        return Err(SchemaError::NotAnObject);
    }
    if approximate_size(schema, MAX_SCHEMA_BYTES + 1) > MAX_SCHEMA_BYTES {
        return Err(SchemaError::TooLarge);
    }
    let defs = definitions(schema);
    let mut budget = MAX_SCHEMA_BYTES;
    let mut out = inline_refs(schema, &defs, 0, &mut budget).ok_or(SchemaError::ExpandsTooMuch)?;
    clean(&mut out);
    let mut root = match out {
        Value::Object(map) => map,
        _ => Map::new(),
    };
    if root.get("type").and_then(Value::as_str) != Some("object") {
        root.insert("type".into(), "object".into());
    }
    ensure_object_shape(&mut root);
    Ok(Value::Object(root))
}

/// The size of `value` as JSON, roughly, counted only up to `limit`.
fn approximate_size(value: &Value, limit: usize) -> usize {
    let mut size = 0;
    let mut stack = vec![value];
    while let Some(value) = stack.pop() {
        size += node_cost(value);
        if size > limit {
            return size;
        }
        match value {
            Value::Object(map) => {
                size += map.keys().map(|k| k.len() + 3).sum::<usize>();
                stack.extend(map.values());
            }
            Value::Array(items) => stack.extend(items),
            _ => {}
        }
    }
    size
}

/// What one value costs of the budget, its children aside.
fn node_cost(value: &Value) -> usize {
    match value {
        Value::String(s) => s.len() + 2,
        Value::Object(map) => 2 + map.keys().map(|k| k.len() + 3).sum::<usize>(),
        _ => 4,
    }
}

/// Takes `cost` from `budget`; `None` once it is spent.
fn spend(budget: &mut usize, cost: usize) -> Option<()> {
    *budget = budget.checked_sub(cost)?;
    Some(())
}

fn definitions(schema: &Value) -> Map<String, Value> {
    let mut defs = Map::new();
    for key in ["$defs", "definitions"] {
        if let Some(Value::Object(map)) = schema.get(key) {
            for (name, def) in map {
                defs.insert(format!("#/{key}/{name}"), def.clone());
            }
        }
    }
    defs
}

/// A copy of `value` with local `$ref`s inlined; `None` when the copy
/// would exceed `budget`.
fn inline_refs(
    value: &Value,
    defs: &Map<String, Value>,
    depth: usize,
    budget: &mut usize,
) -> Option<Value> {
    spend(budget, node_cost(value))?;
    match value {
        Value::Object(map) => {
            if let Some(Value::String(reference)) = map.get("$ref") {
                let target = defs.get(reference.as_str());
                return match target {
                    Some(target) if depth < MAX_REF_DEPTH => {
                        let mut resolved = inline_refs(target, defs, depth + 1, budget)?;
                        // Siblings of $ref (description, title) are kept.
                        if let Value::Object(resolved_map) = &mut resolved {
                            for (k, v) in map.iter().filter(|(k, _)| k.as_str() != "$ref") {
                                if !resolved_map.contains_key(k) {
                                    let v = inline_refs(v, defs, depth, budget)?;
                                    resolved_map.insert(k.clone(), v);
                                }
                            }
                        }
                        Some(resolved)
                    }
                    _ => Some(
                        json!({"type": "object", "description": format!("(a nested {reference} value)")}),
                    ),
                };
            }
            let mut out = Map::new();
            for (k, v) in map {
                out.insert(k.clone(), inline_refs(v, defs, depth, budget)?);
            }
            Some(Value::Object(out))
        }
        Value::Array(items) => items
            .iter()
            .map(|v| inline_refs(v, defs, depth, budget))
            .collect::<Option<Vec<_>>>()
            .map(Value::Array),
        other => Some(other.clone()),
    }
}

fn clean(value: &mut Value) {
    let Value::Object(map) = value else {
        return;
    };
    for key in ["$schema", "$id", "$comment", "$defs", "definitions", "not"] {
        map.remove(key);
    }
    collapse_union(map, "anyOf");
    collapse_union(map, "oneOf");
    merge_single_all_of(map);
    if let Some(Value::Array(types)) = map.get("type") {
        let chosen = types.iter().find(|t| t.as_str() != Some("null")).cloned();
        match chosen {
            Some(t) => map.insert("type".into(), t),
            None => map.remove("type"),
        };
    }
    if matches!(map.get("additionalProperties"), Some(Value::Object(o)) if o.is_empty()) {
        map.remove("additionalProperties");
    }
    for key in ["exclusiveMinimum", "exclusiveMaximum"] {
        if map.get(key).is_some_and(Value::is_boolean) {
            map.remove(key);
        }
    }
    if map.get("type").and_then(Value::as_str) == Some("object") {
        ensure_object_shape(map);
    }
    if let Some(Value::Object(properties)) = map.get_mut("properties") {
        properties.values_mut().for_each(clean);
    }
    for key in ["items", "additionalProperties"] {
        if let Some(child) = map.get_mut(key) {
            clean(child);
        }
    }
    for key in ["anyOf", "oneOf", "allOf", "prefixItems"] {
        if let Some(Value::Array(members)) = map.get_mut(key) {
            members.iter_mut().for_each(clean);
        }
    }
}

/// `anyOf: [X, {"type": "null"}]` and zod's `anyOf: [{"not": {}}, X]` become X.
fn collapse_union(map: &mut Map<String, Value>, key: &str) {
    let Some(Value::Array(members)) = map.get(key) else {
        return;
    };
    let kept: Vec<Value> = members
        .iter()
        .filter(|m| m.get("type").and_then(Value::as_str) != Some("null") && m.get("not").is_none())
        .cloned()
        .collect();
    if kept.len() == 1 {
        map.remove(key);
        if let Value::Object(only) = &kept[0] {
            for (k, v) in only {
                map.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
    } else if kept.is_empty() {
        map.remove(key);
    } else {
        map.insert(key.into(), Value::Array(kept));
    }
}

fn merge_single_all_of(map: &mut Map<String, Value>) {
    if let Some(Value::Array(members)) = map.get("allOf")
        && let [Value::Object(only)] = members.as_slice()
    {
        let only = only.clone();
        map.remove("allOf");
        for (k, v) in only {
            map.entry(k).or_insert(v);
        }
    }
}

/// An object schema has a `properties` object whose values are schemas, and
/// `required` names only those properties.
fn ensure_object_shape(map: &mut Map<String, Value>) {
    let properties = match map.remove("properties") {
        Some(Value::Object(props)) => props
            .into_iter()
            .filter(|(_, v)| v.is_object() || v.is_boolean())
            .collect(),
        _ => Map::new(),
    };
    let required: Vec<Value> = match map.remove("required") {
        Some(Value::Array(names)) => names
            .into_iter()
            .filter(|n| n.as_str().is_some_and(|n| properties.contains_key(n)))
            .collect(),
        _ => Vec::new(),
    };
    map.insert("properties".into(), Value::Object(properties));
    if !required.is_empty() {
        map.insert("required".into(), Value::Array(required));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_argument_tools_get_properties() {
        assert_eq!(
            normalise(&json!({"type": "object"})).unwrap(),
            json!({"type": "object", "properties": {}})
        );
        assert_eq!(
            normalise(&json!({})).unwrap(),
            json!({"type": "object", "properties": {}})
        );
    }

    #[test]
    fn meta_keys_go_and_required_is_filtered() {
        let schema = json!({
            "$schema": "http://json-schema.org/draft-07/schema#",
            "type": "object",
            "properties": {"a": {"type": "string", "title": "A"}, "bad": 5},
            "required": ["a", "ghost", "bad"],
            "additionalProperties": {}
        });
        assert_eq!(
            normalise(&schema).unwrap(),
            json!({"type": "object", "properties": {"a": {"type": "string", "title": "A"}}, "required": ["a"]})
        );
    }

    #[test]
    fn unions_and_type_arrays_collapse() {
        let schema = json!({"type": "object", "properties": {
            "n": {"anyOf": [{"type": "integer"}, {"type": "null"}], "description": "d"},
            "z": {"anyOf": [{"not": {}}, {"type": "string"}]},
            "t": {"type": ["boolean", "string"]},
            "o": {"type": ["null", "object"]}
        }});
        assert_eq!(
            normalise(&schema).unwrap()["properties"],
            json!({
                "n": {"type": "integer", "description": "d"},
                "z": {"type": "string"},
                "t": {"type": "boolean"},
                "o": {"type": "object", "properties": {}}
            })
        );
    }

    #[test]
    fn local_refs_are_inlined_and_recursion_is_cut() {
        let schema = json!({
            "type": "object",
            "properties": {"p": {"$ref": "#/$defs/Point", "description": "where"}, "n": {"$ref": "#/$defs/Node"}},
            "$defs": {
                "Point": {"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"]},
                "Node": {"type": "object", "properties": {"next": {"$ref": "#/$defs/Node"}}}
            }
        });
        let out = normalise(&schema).unwrap();
        assert_eq!(
            out["properties"]["p"]["properties"]["x"],
            json!({"type": "number"})
        );
        assert_eq!(out["properties"]["p"]["description"], "where");
        assert!(out.get("$defs").is_none());
        assert!(!out.to_string().contains("$ref"));
    }

    /// Definitions that each use the next one several times: inlined
    /// naively this grows as 4^depth.
    fn exponential(levels: usize) -> Value {
        let mut defs = Map::new();
        defs.insert("D0".into(), json!({"type": "string"}));
        for i in 1..levels {
            let r = json!({"$ref": format!("#/$defs/D{}", i - 1)});
            defs.insert(
                format!("D{i}"),
                json!({"type": "object", "properties": {"a": r, "b": r, "c": r, "d": r}}),
            );
        }
        json!({"type": "object", "properties": {"x": {"$ref": format!("#/$defs/D{}", levels - 1)}}, "$defs": defs})
    }

    #[test]
    fn exponential_refs_stop_at_the_size_bound() {
        assert!(exponential(9).to_string().len() < 3_000);
        assert_eq!(normalise(&exponential(9)), Err(SchemaError::ExpandsTooMuch));
        // A small expansion of the same shape is still inlined.
        let small = normalise(&exponential(3)).unwrap();
        assert_eq!(
            small["properties"]["x"]["properties"]["a"]["properties"]["b"],
            json!({"type": "string"})
        );
    }

    #[test]
    fn unusable_schemas_are_refused() {
        assert_eq!(normalise(&json!("object")), Err(SchemaError::NotAnObject));
        assert_eq!(normalise(&Value::Null), Err(SchemaError::NotAnObject));
        let huge = json!({"type": "object", "description": "x".repeat(MAX_SCHEMA_BYTES + 1)});
        assert_eq!(normalise(&huge), Err(SchemaError::TooLarge));
    }
}
