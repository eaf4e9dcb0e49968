//! Property tests for the three parsers of outside input: the SSE stream
//! accumulator, the schema normaliser and the MCP config file. Whatever
//! they are given, they do not panic, and what they accept keeps the
//! promises the rest of mcpcord relies on.

use std::collections::HashSet;

use mcpcord::llm::StreamAccumulator;
use mcpcord::mcp::{Transport, config, schema};
use proptest::prelude::*;
use serde_json::{Map, Value, json};

/// Any JSON value, a few levels deep, with keys that the parsers look for.
fn any_json() -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        Just("type".to_owned()),
        Just("properties".to_owned()),
        Just("required".to_owned()),
        Just("$ref".to_owned()),
        Just("$defs".to_owned()),
        Just("anyOf".to_owned()),
        Just("items".to_owned()),
        Just("command".to_owned()),
        Just("id".to_owned()),
        Just("index".to_owned()),
        "[a-z]{1,6}",
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        prop_oneof![
            Just("object".to_owned()),
            Just("#/$defs/a".to_owned()),
            Just("#/$defs/b".to_owned()),
            ".{0,8}",
        ]
        .prop_map(Value::String),
    ];
    leaf.prop_recursive(5, 64, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::vec((key.clone(), inner), 0..6)
                .prop_map(|pairs| Value::Object(pairs.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// A stream chunk as providers send them, with fields that may be odd.
fn chunk() -> impl Strategy<Value = Value> {
    let call = (
        prop::option::of(0u64..4),
        prop::option::of(prop_oneof![Just("a"), Just("b"), Just("")]),
        prop::option::of(prop_oneof![Just("t__x"), Just("t__y")]),
        prop::option::of(".{0,6}"),
    )
        .prop_map(|(index, id, name, arguments)| {
            let mut call = Map::new();
            if let Some(index) = index {
                call.insert("index".into(), json!(index));
            }
            if let Some(id) = id {
                call.insert("id".into(), json!(id));
            }
            let mut function = Map::new();
            if let Some(name) = name {
                function.insert("name".into(), json!(name));
            }
            if let Some(arguments) = arguments {
                function.insert("arguments".into(), json!(arguments));
            }
            call.insert("function".into(), Value::Object(function));
            Value::Object(call)
        });
    prop_oneof![
        (
            prop::collection::vec(call, 0..3),
            prop::option::of(prop_oneof![
                Just("stop"),
                Just("tool_calls"),
                Just("length")
            ]),
            ".{0,5}"
        )
            .prop_map(|(calls, finish, text)| json!({"choices": [{
                "delta": {"content": text, "tool_calls": calls},
                "finish_reason": finish
            }]})),
        any_json(),
    ]
}

proptest! {
    #[test]
    fn the_stream_accumulator_keeps_calls_apart_with_unique_ids(
        chunks in prop::collection::vec(chunk(), 0..12),
        done in any::<bool>(),
    ) {
        let mut accumulator = StreamAccumulator::default();
        for chunk in &chunks {
            if accumulator.apply(chunk, &()).is_err() {
                return Ok(());
            }
        }
        if done {
            accumulator.done();
        }
        if let Ok(completion) = accumulator.finish() {
            let calls = &completion.message.tool_calls;
            let ids: HashSet<&str> = calls.iter().map(|c| c.id.as_str()).collect();
            prop_assert_eq!(ids.len(), calls.len());
            prop_assert!(calls.iter().all(|c| !c.id.is_empty() && !c.name.is_empty()));
        }
    }

    #[test]
    fn normalised_schemas_are_bounded_object_schemas(input in any_json()) {
        if let Ok(out) = schema::normalise(&input) {
            prop_assert_eq!(out["type"].as_str(), Some("object"));
            let properties = out["properties"].as_object();
            prop_assert!(properties.is_some());
            if let Some(required) = out.get("required").and_then(Value::as_array) {
                for name in required {
                    prop_assert!(properties.unwrap().contains_key(name.as_str().unwrap()));
                }
            }
            prop_assert!(out.to_string().len() <= 2 * schema::MAX_SCHEMA_BYTES);
        }
    }

    #[test]
    fn the_config_parser_never_panics_and_names_every_server(
        servers in prop::collection::vec(("[a-z]{0,4}", any_json()), 0..4),
        raw in ".{0,40}",
    ) {
        let env = |name: &str| (name == "SET").then(|| "value".to_owned());
        let _ = config::parse(&raw, "mcp.json", &env);
        let body: Map<String, Value> = servers.into_iter().collect();
        let text = json!({"mcpServers": body}).to_string();
        match config::parse(&text, "mcp.json", &env) {
            Ok(specs) => {
                for spec in specs {
                    prop_assert!(!spec.name.is_empty());
                    if let Transport::Stdio { command, .. } = &spec.transport {
                        prop_assert!(!command.trim().is_empty());
                    }
                }
            }
            Err(error) => prop_assert!(error.to_string().starts_with("MCP config mcp.json")),
        }
    }
}

#[test]
fn refs_between_definitions_are_resolved_under_the_bound() {
    // The shape the generator above reaches only rarely: two definitions
    // that refer to each other, used several times.
    let input = json!({"type": "object", "properties": {"x": {"$ref": "#/$defs/a"}, "y": {"$ref": "#/$defs/a"}},
        "$defs": {"a": {"type": "object", "properties": {"b": {"$ref": "#/$defs/b"}, "c": {"$ref": "#/$defs/b"}}},
                  "b": {"type": "object", "properties": {"a": {"$ref": "#/$defs/a"}}}}});
    let out = schema::normalise(&input).unwrap();
    assert!(!out.to_string().contains("$ref"));
}
