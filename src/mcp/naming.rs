//! Tool names the model sees: `server__tool`, within `^[a-zA-Z0-9_-]{1,64}$`,
//! starting with a letter, collision-free. The map back to (server, tool) is
//! kept by the caller; a name is never split to recover the original.

use std::collections::HashMap;

const MAX_NAME: usize = 64;
/// Characters of the server name kept in the prefix.
const MAX_SERVER_PART: usize = 16;

/// Names for `pairs` of (server, tool), in the same order.
pub fn exposed_names(pairs: &[(&str, &str)]) -> Vec<String> {
    let mut names: Vec<String> = pairs.iter().map(|(s, t)| candidate(s, t)).collect();
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for name in &names {
        *counts.entry(name.as_str()).or_default() += 1;
    }
    let clashing: Vec<bool> = names.iter().map(|n| counts[n.as_str()] > 1).collect();
    for ((name, clash), (server, tool)) in names.iter_mut().zip(clashing).zip(pairs) {
        if clash && !has_hash_suffix(name, server, tool) {
            *name = with_hash(name, server, tool);
        }
    }
    names
}

/// The plain name when sanitising loses nothing and it fits; otherwise a
/// sanitised, shortened name with a hash of the original pair.
fn candidate(server: &str, tool: &str) -> String {
    let server_part: String = sanitise(server)
        .to_lowercase()
        .chars()
        .take(MAX_SERVER_PART)
        .collect();
    let mut name = format!("{server_part}__{}", sanitise(tool));
    if !name.starts_with(|c: char| c.is_ascii_alphabetic()) {
        name = format!("t_{name}");
    }
    if name == format!("{server}__{tool}") && name.len() <= MAX_NAME {
        name
    } else {
        with_hash(&name, server, tool)
    }
}

fn sanitise(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn hash_of(server: &str, tool: &str) -> String {
    // FNV-1a: stable across builds, so stored histories keep their names.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in server.bytes().chain([0]).chain(tool.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{:08x}", hash as u32)
}

fn with_hash(name: &str, server: &str, tool: &str) -> String {
    let base: String = name.chars().take(MAX_NAME - 9).collect();
    format!("{base}_{}", hash_of(server, tool))
}

fn has_hash_suffix(name: &str, server: &str, tool: &str) -> bool {
    name.ends_with(&hash_of(server, tool))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid(name: &str) -> bool {
        (1..=MAX_NAME).contains(&name.len())
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            && name.starts_with(|c: char| c.is_ascii_alphabetic())
    }

    #[test]
    fn plain_names_stay_readable() {
        assert_eq!(exposed_names(&[("fs", "read_file")]), ["fs__read_file"]);
    }

    #[test]
    fn odd_names_are_sanitised_and_distinct() {
        let long = "x".repeat(100);
        let pairs = [
            ("fs", "admin.tools.list"),
            ("fs", "admin_tools_list"),
            ("fs", "admin tools list"),
            ("My Server", "get"),
            ("9lives", "tool"),
            ("fs", long.as_str()),
            ("a__b", "c"),
            ("a", "b__c"),
        ];
        let names = exposed_names(&pairs);
        for name in &names {
            assert!(valid(name), "{name} is not a valid function name");
        }
        let unique: std::collections::HashSet<_> = names.iter().collect();
        assert_eq!(unique.len(), names.len(), "{names:?}");
        assert_eq!(names[1], "fs__admin_tools_list");
    }

    #[test]
    fn names_are_stable() {
        assert_eq!(
            exposed_names(&[("s", "a.b")]),
            exposed_names(&[("s", "a.b")])
        );
    }
}
