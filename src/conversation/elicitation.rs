//! Questions a tool server asks the person during a call (MCP
//! elicitation): a form of a few plain fields, or a web page to open.
//! Surfaces show them; this module reads what the person typed.

use serde_json::{Map, Value, json};

/// A server's question, asked on behalf of one tool call.
#[derive(Debug, Clone, PartialEq)]
pub struct Question {
    /// The server's name, as configured.
    pub server: String,
    /// The tool whose call asks (the server's own name for it).
    pub tool: String,
    /// What the server says it needs, in its words.
    pub message: String,
    pub kind: QuestionKind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum QuestionKind {
    /// Fields to fill in, in the order shown.
    Form(Vec<Field>),
    /// A page to open in a browser, never fetched by mcpcord; the call is
    /// tried again once the person says they are done.
    Url(String),
}

/// One field of a form.
#[derive(Debug, Clone, PartialEq)]
pub struct Field {
    /// The key of the answer.
    pub name: String,
    /// What people see: the server's title, else the name.
    pub title: String,
    pub description: Option<String>,
    pub required: bool,
    pub kind: FieldKind,
    /// The server's suggestion, already of the field's type.
    pub default: Option<Value>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum FieldKind {
    Text {
        min_chars: Option<u64>,
        max_chars: Option<u64>,
        /// `email`, `uri`, `date` or `date-time`, as the server gave it.
        format: Option<String>,
    },
    Number {
        integer: bool,
        minimum: Option<f64>,
        maximum: Option<f64>,
    },
    Boolean,
    /// One of (or with `many`, several of) these values.
    Choice {
        options: Vec<Choice>,
        many: bool,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    pub value: String,
    pub label: String,
}

/// What the person answered.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// The values given (for a URL: that the page was opened and done).
    Accept(Map<String, Value>),
    /// No, but the call may go on without it.
    Decline,
    /// Stop what the call was doing.
    Cancel,
}

impl Answer {
    /// The answer as MCP sends it back.
    pub fn to_mcp(&self) -> Value {
        match self {
            Answer::Accept(content) if content.is_empty() => json!({"action": "accept"}),
            Answer::Accept(content) => json!({"action": "accept", "content": content}),
            Answer::Decline => json!({"action": "decline"}),
            Answer::Cancel => json!({"action": "cancel"}),
        }
    }

    /// How the answer is said in a notice: "answered", "declined", "cancelled".
    pub fn said(&self) -> &'static str {
        match self {
            Answer::Accept(_) => "answered",
            Answer::Decline => "declined",
            Answer::Cancel => "cancelled",
        }
    }
}

/// Parts of field names that mean a secret. Servers must not ask for
/// secrets in forms, so a form that does is refused.
const SECRET_WORDS: [&str; 9] = [
    "password",
    "passwd",
    "passphrase",
    "secret",
    "token",
    "apikey",
    "api_key",
    "credential",
    "private_key",
];

impl Question {
    /// The fields whose name or title reads like a password, token or key.
    pub fn secret_fields(&self) -> Vec<&str> {
        let QuestionKind::Form(fields) = &self.kind else {
            return Vec::new();
        };
        fields
            .iter()
            .filter(|f| {
                let said = format!("{} {}", f.name, f.title)
                    .to_lowercase()
                    .replace(['-', ' '], "_");
                SECRET_WORDS.iter().any(|w| said.contains(w))
                    || said.split('_').any(|part| part == "pin" || part == "otp")
            })
            .map(|f| f.name.as_str())
            .collect()
    }
}

impl Field {
    /// Reads what the person typed for this field. Empty text is no
    /// value: the default when there is one, else nothing (an error when
    /// the field is required).
    pub fn read(&self, text: &str) -> Result<Option<Value>, String> {
        let text = text.trim();
        if text.is_empty() {
            return match (&self.default, self.required) {
                (Some(default), _) => Ok(Some(default.clone())),
                (None, true) => Err(format!("{} is required", self.title)),
                (None, false) => Ok(None),
            };
        }
        let value = match &self.kind {
            FieldKind::Text {
                min_chars,
                max_chars,
                ..
            } => {
                let chars = text.chars().count() as u64;
                if min_chars.is_some_and(|min| chars < min) {
                    return Err(format!(
                        "{} needs at least {} characters",
                        self.title,
                        min_chars.unwrap_or_default()
                    ));
                }
                if max_chars.is_some_and(|max| chars > max) {
                    return Err(format!(
                        "{} takes at most {} characters",
                        self.title,
                        max_chars.unwrap_or_default()
                    ));
                }
                Value::String(text.to_owned())
            }
            FieldKind::Number {
                integer,
                minimum,
                maximum,
            } => {
                let number: f64 = text
                    .parse()
                    .ok()
                    .filter(|n: &f64| n.is_finite())
                    .ok_or_else(|| format!("{} must be a number, not \"{text}\"", self.title))?;
                if *integer && number.fract() != 0.0 {
                    return Err(format!("{} must be a whole number", self.title));
                }
                if minimum.is_some_and(|min| number < min)
                    || maximum.is_some_and(|max| number > max)
                {
                    return Err(format!(
                        "{} must be {}",
                        self.title,
                        range(*minimum, *maximum)
                    ));
                }
                if *integer {
                    json!(number as i64)
                } else {
                    json!(number)
                }
            }
            FieldKind::Boolean => match text.to_lowercase().as_str() {
                "y" | "yes" | "true" | "1" | "on" => Value::Bool(true),
                "n" | "no" | "false" | "0" | "off" => Value::Bool(false),
                _ => return Err(format!("{} is yes or no, not \"{text}\"", self.title)),
            },
            FieldKind::Choice { options, many } => {
                let pick = |word: &str| {
                    let word = word.trim();
                    options
                        .iter()
                        .find(|o| o.value == word || o.label.eq_ignore_ascii_case(word))
                        .map(|o| Value::String(o.value.clone()))
                        .ok_or_else(|| {
                            let known: Vec<&str> =
                                options.iter().map(|o| o.label.as_str()).collect();
                            format!(
                                "{} is one of {}, not \"{word}\"",
                                self.title,
                                known.join(", ")
                            )
                        })
                };
                if *many {
                    let picked: Result<Vec<Value>, String> = text
                        .split(',')
                        .filter(|w| !w.trim().is_empty())
                        .map(pick)
                        .collect();
                    Value::Array(picked?)
                } else {
                    pick(text)?
                }
            }
        };
        Ok(Some(value))
    }

    /// A short hint of what the field takes: "yes/no", "a whole number from
    /// 1 to 10", "one of: red, green".
    pub fn hint(&self) -> String {
        match &self.kind {
            FieldKind::Text { format, .. } => format.clone().unwrap_or_else(|| "text".into()),
            FieldKind::Number {
                integer,
                minimum,
                maximum,
            } => {
                let what = if *integer {
                    "a whole number"
                } else {
                    "a number"
                };
                match (minimum, maximum) {
                    (None, None) => what.to_owned(),
                    _ => format!("{what} {}", range(*minimum, *maximum)),
                }
            }
            FieldKind::Boolean => "yes/no".into(),
            FieldKind::Choice { options, many } => {
                let labels: Vec<&str> = options.iter().map(|o| o.label.as_str()).collect();
                let how = if *many { "any of" } else { "one of" };
                format!("{how}: {}", labels.join(", "))
            }
        }
    }
}

fn range(minimum: Option<f64>, maximum: Option<f64>) -> String {
    match (minimum, maximum) {
        (Some(min), Some(max)) => format!("from {min} to {max}"),
        (Some(min), None) => format!("at least {min}"),
        (None, Some(max)) => format!("at most {max}"),
        (None, None) => String::new(),
    }
}

/// Checks a form's answers: every required field has a value.
pub fn complete(fields: &[Field], values: &Map<String, Value>) -> Result<(), String> {
    let missing: Vec<&str> = fields
        .iter()
        .filter(|f| f.required && !values.contains_key(&f.name))
        .map(|f| f.title.as_str())
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!("still needed: {}", missing.join(", ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(name: &str, kind: FieldKind) -> Field {
        Field {
            name: name.into(),
            title: name.into(),
            description: None,
            required: true,
            kind,
            default: None,
        }
    }

    #[test]
    fn typed_text_is_read_as_its_field_and_bad_values_are_named() {
        let count = field(
            "count",
            FieldKind::Number {
                integer: true,
                minimum: Some(1.0),
                maximum: Some(10.0),
            },
        );
        assert_eq!(count.read(" 3 "), Ok(Some(json!(3))));
        assert_eq!(
            count.read("2.5"),
            Err("count must be a whole number".into())
        );
        assert_eq!(count.read("11"), Err("count must be from 1 to 10".into()));
        assert_eq!(
            count.read("many"),
            Err("count must be a number, not \"many\"".into())
        );
        assert_eq!(count.read(""), Err("count is required".into()));
        let ok = field("ok", FieldKind::Boolean);
        assert_eq!(ok.read("Yes"), Ok(Some(json!(true))));
        assert!(ok.read("maybe").is_err());
        let colour = Field {
            required: false,
            default: Some(json!("r")),
            ..field(
                "colour",
                FieldKind::Choice {
                    options: vec![
                        Choice {
                            value: "r".into(),
                            label: "Red".into(),
                        },
                        Choice {
                            value: "g".into(),
                            label: "Green".into(),
                        },
                    ],
                    many: false,
                },
            )
        };
        assert_eq!(colour.read("green"), Ok(Some(json!("g"))));
        assert_eq!(colour.read(""), Ok(Some(json!("r"))), "the default");
        assert_eq!(
            colour.read("blue"),
            Err("colour is one of Red, Green, not \"blue\"".into())
        );
        let short = field(
            "code",
            FieldKind::Text {
                min_chars: Some(2),
                max_chars: Some(3),
                format: None,
            },
        );
        assert!(short.read("a").is_err() && short.read("abcd").is_err());
        assert_eq!(short.read("abc"), Ok(Some(json!("abc"))));
    }

    #[test]
    fn fields_named_like_secrets_are_found() {
        let text = || FieldKind::Text {
            min_chars: None,
            max_chars: None,
            format: None,
        };
        let question = Question {
            server: "s".into(),
            tool: "t".into(),
            message: "m".into(),
            kind: QuestionKind::Form(vec![
                field("name", text()),
                field("GitHub-Token", text()),
                field("db password", text()),
                field("pin", text()),
                field("spinner", text()),
                field("open_api_key", text()),
            ]),
        };
        assert_eq!(
            question.secret_fields(),
            ["GitHub-Token", "db password", "pin", "open_api_key"]
        );
    }

    #[test]
    fn answers_go_back_as_mcp_says() {
        let mut values = Map::new();
        values.insert("a".into(), json!(1));
        assert_eq!(
            Answer::Accept(values).to_mcp(),
            json!({"action": "accept", "content": {"a": 1}})
        );
        assert_eq!(
            Answer::Accept(Map::new()).to_mcp(),
            json!({"action": "accept"})
        );
        assert_eq!(Answer::Cancel.to_mcp(), json!({"action": "cancel"}));
    }
}
