//! Prometheus metrics of one command run, for node_exporter's textfile collector (`--metrics-file`).
//!
//! Commands record what they did with [`gauge`]; when the run ends, [`write_file`] writes those together with
//! the run's outcome (success, exit code, duration, end time) in the text exposition format, through a
//! temporary file and a rename so that the collector never reads half a file. A failed run keeps the previous
//! file's last-success time for the same command and repository: "no successful backup for 26 hours" stays
//! something an alert can see, whatever the failures in between.
//!
//! Nothing is recorded anywhere else: a library user who never calls [`write_file`] only pays for a few
//! pushes onto a vector.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

struct Sample {
    name: &'static str,
    help: &'static str,
    labels: Vec<(&'static str, String)>,
    value: f64,
}

static SAMPLES: Mutex<Vec<Sample>> = Mutex::new(Vec::new());

/// Records a gauge of this run; a later sample with the same name and labels replaces it.
pub fn gauge(name: &'static str, help: &'static str, labels: &[(&'static str, &str)], value: f64) {
    let labels: Vec<(&'static str, String)> = labels.iter().map(|(k, v)| (*k, v.to_string())).collect();
    let mut samples = SAMPLES.lock().unwrap_or_else(|p| p.into_inner());
    samples.retain(|s| !(s.name == name && s.labels == labels));
    samples.push(Sample { name, help, labels, value });
}

/// How a run ended.
pub struct Outcome<'a> {
    /// The subcommand (`backup`, `check`, …).
    pub command: &'a str,
    /// The repository location as given (no secrets: credentials never appear in it).
    pub repository: &'a str,
    pub duration: Duration,
    pub exit_code: i32,
}

const LAST_SUCCESS: &str = "diskvault_last_success_timestamp_seconds";

/// Writes the run's outcome and every recorded sample to `path` (replacing it atomically).
pub fn write_file(path: &Path, outcome: &Outcome) -> std::io::Result<()> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
    let common = [("command", outcome.command.to_string()), ("repository", outcome.repository.to_string())];
    let common_text = render_labels(&common, &[]);
    let last_success = if outcome.exit_code == 0 {
        Some(now)
    } else {
        std::fs::read_to_string(path).ok().and_then(|old| previous_value(&old, LAST_SUCCESS, &common_text))
    };

    let success = if outcome.exit_code == 0 { 1.0 } else { 0.0 };
    gauge("diskvault_run_success", "Whether the last run succeeded (1) or failed (0).", &[], success);
    gauge("diskvault_run_exit_code", "Exit code of the last run.", &[], outcome.exit_code as f64);
    gauge("diskvault_run_duration_seconds", "Wall time of the last run.", &[], outcome.duration.as_secs_f64());
    gauge("diskvault_run_timestamp_seconds", "When the last run ended (Unix time).", &[], now);
    if let Some(t) = last_success {
        gauge(LAST_SUCCESS, "When a run last succeeded (Unix time).", &[], t);
    }
    let mut out = String::new();
    let samples = SAMPLES.lock().unwrap_or_else(|p| p.into_inner());
    let mut names: Vec<&'static str> = Vec::new();
    for s in samples.iter() {
        if !names.contains(&s.name) {
            names.push(s.name);
        }
    }
    for name in names {
        let mut of_name = samples.iter().filter(|s| s.name == name).peekable();
        let help = of_name.peek().map(|s| s.help).unwrap_or_default();
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for s in of_name {
            let _ = writeln!(out, "{name}{} {}", render_labels(&common, &s.labels), s.value);
        }
    }
    drop(samples);

    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| std::io::Error::other("the metrics file needs a file name"))?;
    // The collector reads only `*.prom`: a temporary name without that suffix is never read half-written.
    let tmp = dir.join(format!(".{}.{}.tmp", name.to_string_lossy(), std::process::id()));
    crate::util::replace_file(path, &tmp, out.as_bytes(), false)
}

/// `{k="v",…}` for the common labels followed by the sample's own, values escaped as the format requires.
fn render_labels(common: &[(&'static str, String)], own: &[(&'static str, String)]) -> String {
    let mut s = String::from("{");
    for (i, (k, v)) in common.iter().chain(own).enumerate() {
        if i > 0 {
            s.push(',');
        }
        let v = v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
        let _ = write!(s, "{k}=\"{v}\"");
    }
    s.push('}');
    s
}

/// The value of `name{labels}` in an earlier file, if it has one.
fn previous_value(old: &str, name: &str, labels: &str) -> Option<f64> {
    let prefix = format!("{name}{labels} ");
    old.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        let common = [("repository", "s3:https://h/b\"x\\y\nz".to_string())];
        assert_eq!(render_labels(&common, &[]), r#"{repository="s3:https://h/b\"x\\y\nz"}"#);
    }

    #[test]
    fn an_earlier_value_is_found_only_for_the_same_labels() {
        let old = "# HELP x y\nx{command=\"backup\",repository=\"/r\"} 1700000000.5\n\
                   x{command=\"check\",repository=\"/r\"} 5\n";
        assert_eq!(previous_value(old, "x", "{command=\"backup\",repository=\"/r\"}"), Some(1700000000.5));
        assert_eq!(previous_value(old, "x", "{command=\"prune\",repository=\"/r\"}"), None);
        assert_eq!(previous_value("garbage{", "x", "{}"), None);
    }
}
