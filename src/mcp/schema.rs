//! MCP input schemas made acceptable to strict providers: local `$ref`s
//! inlined, meta keys dropped, nullable unions collapsed, objects given
//! `properties`, `required` limited to properties that exist.

use serde_json::{Map, Value, json};

/// How deep `$ref`s are followed before a recursive one is cut off.
const MAX_REF_DEPTH: usize = 8;

/// A normalised copy of `schema`, always an object schema at the root.
pub fn normalise(schema: &Value) -> Value {
    let defs = definitions(schema);
    let mut out = inline_refs(schema, &defs, 0);
    clean(&mut out);
    let mut root = match out {
        Value::Object(map) => map,
        _ => Map::new(),
    };
    if root.get("type").and_then(Value::as_str) != Some("object") {
        root.insert("type".into(), "object".into());
    }
    ensure_object_shape(&mut root);
    Value::Object(root)
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

fn inline_refs(value: &Value, defs: &Map<String, Value>, depth: usize) -> Value {
    match value {
        Value::Object(map) => {
            if let Some(Value::String(reference)) = map.get("$ref") {
                let target = defs.get(reference.as_str());
                return match target {
                    Some(target) if depth < MAX_REF_DEPTH => {
                        let mut resolved = inline_refs(target, defs, depth + 1);
                        // Siblings of $ref (description, title) are kept.
                        if let Value::Object(resolved_map) = &mut resolved {
                            for (k, v) in map.iter().filter(|(k, _)| k.as_str() != "$ref") {
                                resolved_map
                                    .entry(k.clone())
                                    .or_insert_with(|| inline_refs(v, defs, depth));
                            }
                        }
                        resolved
                    }
                    _ => {
                        json!({"type": "object", "description": format!("(a nested {reference} value)")})
                    }
                };
            }
            Value::Object(
                map.iter()
                    .map(|(k, v)| (k.clone(), inline_refs(v, defs, depth)))
                    .collect(),
            )
        }
        Value::Array(items) => {
            Value::Array(items.iter().map(|v| inline_refs(v, defs, depth)).collect())
        }
        other => other.clone(),
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
            normalise(&json!({"type": "object"})),
            json!({"type": "object", "properties": {}})
        );
        assert_eq!(
            normalise(&json!({})),
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
            normalise(&schema),
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
            normalise(&schema)["properties"],
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
        let out = normalise(&schema);
        assert_eq!(
            out["properties"]["p"]["properties"]["x"],
            json!({"type": "number"})
        );
        assert_eq!(out["properties"]["p"]["description"], "where");
        assert!(out.get("$defs").is_none());
        assert!(!out.to_string().contains("$ref"));
    }
}
