//! A server's `elicitation/create` parameters read into a [`Question`]:
//! a flat form of primitive fields, or a URL to open.

use serde_json::Value;

use crate::conversation::elicitation::{Choice, Field, FieldKind, Question, QuestionKind};

/// Fields one form may have; a longer one is refused.
pub const MAX_FIELDS: usize = 25;
/// Options one choice may have (Discord's select menus hold 25).
pub const MAX_OPTIONS: usize = 25;
/// Characters of a URL to open: it is shown whole, so longer is refused.
pub const MAX_URL_CHARS: usize = 1000;
/// Characters of a server's message kept.
const MAX_MESSAGE_CHARS: usize = 1500;

/// Reads the parameters of an elicitation request from `server` during a
/// call of `tool`. The error says what is wrong with it, for the log and
/// the person.
pub fn question(server: &str, tool: &str, params: &Value) -> Result<Question, String> {
    let message: String = params
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .trim()
        .chars()
        .take(MAX_MESSAGE_CHARS)
        .collect();
    let kind = match params.get("mode").and_then(Value::as_str).unwrap_or("form") {
        "url" => QuestionKind::Url(url(params)?),
        "form" => QuestionKind::Form(form(params.get("requestedSchema"))?),
        other => {
            return Err(format!(
                "it asked in a mode mcpcord does not know (\"{other}\")"
            ));
        }
    };
    Ok(Question {
        server: server.to_owned(),
        tool: tool.to_owned(),
        message,
        kind,
    })
}

fn url(params: &Value) -> Result<String, String> {
    let text = params
        .get("url")
        .and_then(Value::as_str)
        .ok_or("it asked to open a page without giving its URL")?;
    if text.len() > MAX_URL_CHARS {
        return Err(format!(
            "the URL it gave is longer than {MAX_URL_CHARS} characters, too long to show whole"
        ));
    }
    let parsed =
        reqwest::Url::parse(text).map_err(|e| format!("the URL it gave is not valid ({e})"))?;
    if !matches!(parsed.scheme(), "https" | "http") || parsed.host_str().is_none() {
        return Err(format!(
            "it asked to open a {} URL; only web pages (https) are shown",
            parsed.scheme()
        ));
    }
    Ok(parsed.to_string())
}

fn form(schema: Option<&Value>) -> Result<Vec<Field>, String> {
    let properties = schema
        .and_then(|s| s.get("properties"))
        .and_then(Value::as_object)
        .ok_or("its form has no \"properties\"")?;
    if properties.len() > MAX_FIELDS {
        return Err(format!(
            "its form has {} fields; at most {MAX_FIELDS} are asked",
            properties.len()
        ));
    }
    let required: Vec<&str> = schema
        .and_then(|s| s.get("required"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let mut fields: Vec<Field> = properties
        .iter()
        .map(|(name, property)| field(name, property, required.contains(&name.as_str())))
        .collect::<Result<_, _>>()?;
    // Required fields first; otherwise the schema's order.
    fields.sort_by_key(|f| !f.required);
    Ok(fields)
}

fn field(name: &str, property: &Value, required: bool) -> Result<Field, String> {
    let text = |key: &str| {
        property
            .get(key)
            .and_then(Value::as_str)
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_owned)
    };
    let number = |key: &str| property.get(key).and_then(Value::as_f64);
    let count = |key: &str| property.get(key).and_then(Value::as_u64);
    let kind = match property.get("type").and_then(Value::as_str) {
        Some("string") => match choices(property)? {
            Some(options) => FieldKind::Choice {
                options,
                many: false,
            },
            None => FieldKind::Text {
                min_chars: count("minLength"),
                max_chars: count("maxLength"),
                format: text("format"),
            },
        },
        Some(kind @ ("number" | "integer")) => FieldKind::Number {
            integer: kind == "integer",
            minimum: number("minimum"),
            maximum: number("maximum"),
        },
        Some("boolean") => FieldKind::Boolean,
        Some("array") => match property.get("items").map(choices).transpose()?.flatten() {
            Some(options) => FieldKind::Choice {
                options,
                many: true,
            },
            None => {
                return Err(format!(
                    "its form's field \"{name}\" is a list of something other than choices"
                ));
            }
        },
        other => {
            return Err(format!(
                "its form's field \"{name}\" is of a kind forms may not have ({})",
                other.unwrap_or("no type")
            ));
        }
    };
    let default = property.get("default").filter(|d| fits(&kind, d)).cloned();
    Ok(Field {
        name: name.to_owned(),
        title: text("title").unwrap_or_else(|| name.to_owned()),
        description: text("description"),
        required,
        kind,
        default,
    })
}

/// The options of an enum: `enum` (with the older `enumNames` as labels),
/// or `oneOf`/`anyOf` of `{const, title}`.
fn choices(property: &Value) -> Result<Option<Vec<Choice>>, String> {
    let options: Vec<Choice> = if let Some(values) = property.get("enum").and_then(Value::as_array)
    {
        let names = property.get("enumNames").and_then(Value::as_array);
        values
            .iter()
            .enumerate()
            .filter_map(|(i, v)| {
                let value = v.as_str()?.to_owned();
                let label = names
                    .and_then(|n| n.get(i))
                    .and_then(Value::as_str)
                    .map_or_else(|| value.clone(), str::to_owned);
                Some(Choice { value, label })
            })
            .collect()
    } else if let Some(items) = property
        .get("oneOf")
        .or_else(|| property.get("anyOf"))
        .and_then(Value::as_array)
    {
        items
            .iter()
            .filter_map(|item| {
                let value = item.get("const")?.as_str()?.to_owned();
                let label = item
                    .get("title")
                    .and_then(Value::as_str)
                    .map_or_else(|| value.clone(), str::to_owned);
                Some(Choice { value, label })
            })
            .collect()
    } else {
        return Ok(None);
    };
    match options.len() {
        0 => Err("its form has a choice without options".into()),
        n if n > MAX_OPTIONS => Err(format!(
            "its form has a choice of {n} options; at most {MAX_OPTIONS} are shown"
        )),
        _ => Ok(Some(options)),
    }
}

/// Whether `value` is of the field's kind (a default that is not is left out).
fn fits(kind: &FieldKind, value: &Value) -> bool {
    match kind {
        FieldKind::Text { .. } => value.is_string(),
        FieldKind::Number { integer: true, .. } => value.is_i64() || value.is_u64(),
        FieldKind::Number { .. } => value.is_number(),
        FieldKind::Boolean => value.is_boolean(),
        FieldKind::Choice { options, many } => {
            let known = |v: &Value| options.iter().any(|o| v.as_str() == Some(&o.value));
            if *many {
                value
                    .as_array()
                    .is_some_and(|items| items.iter().all(known))
            } else {
                known(value)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_form_becomes_typed_fields_with_required_ones_first() {
        let params = json!({"message": "Book a table", "requestedSchema": {"type": "object",
            "properties": {
                "guests": {"type": "integer", "title": "Guests", "minimum": 1, "maximum": 12, "default": 2},
                "name": {"type": "string", "maxLength": 40},
                "outside": {"type": "boolean", "default": "yes"},
                "time": {"type": "string", "oneOf": [{"const": "19", "title": "7 pm"}, {"const": "21", "title": "9 pm"}]},
                "diet": {"type": "array", "items": {"enum": ["vegan", "halal"]}}
            },
            "required": ["name", "time"]}});
        let question = question("diner", "book", &params).unwrap();
        assert_eq!(question.message, "Book a table");
        let QuestionKind::Form(fields) = question.kind else {
            panic!("a form");
        };
        let names: Vec<&str> = fields.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["name", "time", "diet", "guests", "outside"]);
        assert_eq!(fields[3].title, "Guests");
        assert_eq!(fields[3].default, Some(json!(2)));
        assert_eq!(
            fields[4].default, None,
            "a default of the wrong type is left out"
        );
        assert!(
            matches!(&fields[1].kind, FieldKind::Choice { options, many: false } if options[0].label == "7 pm")
        );
        assert!(matches!(
            &fields[2].kind,
            FieldKind::Choice { many: true, .. }
        ));
    }

    #[test]
    fn forms_and_urls_that_cannot_be_asked_are_refused_with_why() {
        let nested = json!({"requestedSchema": {"properties": {"address": {"type": "object"}}}});
        assert!(
            question("s", "t", &nested)
                .unwrap_err()
                .contains("field \"address\" is of a kind forms may not have (object)")
        );
        let script = json!({"mode": "url", "url": "javascript:alert(1)", "message": "m"});
        assert!(
            question("s", "t", &script)
                .unwrap_err()
                .contains("javascript URL")
        );
        let page = json!({"mode": "url", "url": "https://auth.example.com/connect?x=1", "message": "Sign in"});
        assert_eq!(
            question("s", "t", &page).unwrap().kind,
            QuestionKind::Url("https://auth.example.com/connect?x=1".into())
        );
    }
}
