//! The health file: the bot records whether its gateway connection is up,
//! and `mcpcord health` (the container's HEALTHCHECK) reads it.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A record older than this means the bot stopped updating it.
pub const MAX_AGE: Duration = Duration::from_secs(60);

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Records the connection state with the current time.
pub fn write(path: &Path, connected: bool) -> std::io::Result<()> {
    let state = if connected {
        "connected"
    } else {
        "disconnected"
    };
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, format!("{state} {}\n", now()))?;
    std::fs::rename(temporary, path)
}

/// Whether the bot is connected, or a sentence saying why not.
pub fn read(path: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        format!(
            "no health record at {} ({e}): the bot has not connected yet",
            path.display()
        )
    })?;
    let mut words = text.split_whitespace();
    let state = words.next().unwrap_or("");
    let at: u64 = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
    let age = now().saturating_sub(at);
    if age > MAX_AGE.as_secs() {
        return Err(format!(
            "the health record is {age} s old: the bot is stuck or stopped"
        ));
    }
    if state != "connected" {
        return Err("the bot is not connected to the Discord gateway".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("health");
        assert!(read(&path).unwrap_err().contains("not connected yet"));
        write(&path, false).unwrap();
        assert!(read(&path).unwrap_err().contains("not connected"));
        write(&path, true).unwrap();
        assert_eq!(read(&path), Ok(()));
        std::fs::write(&path, "connected 1000\n").unwrap();
        assert!(read(&path).unwrap_err().contains("stuck"));
    }
}
