//! Logging into the proxy's own log; the host tags each line with the
//! filter's name.
//!
//! ```no_run
//! use sluicegate_sdk::log;
//! log::info("starting");
//! log::warn(format!("odd header: {}", "x"));
//! ```

use crate::bindings::sluicegate::filter::log as host;
use crate::LogLevel;

/// Writes one line at this level.
pub fn write(level: LogLevel, message: impl AsRef<str>) {
    host::write(level, message.as_ref())
}

/// Writes one line at level `trace`.
pub fn trace(message: impl AsRef<str>) {
    write(LogLevel::Trace, message)
}

/// Writes one line at level `debug`.
pub fn debug(message: impl AsRef<str>) {
    write(LogLevel::Debug, message)
}

/// Writes one line at level `info`.
pub fn info(message: impl AsRef<str>) {
    write(LogLevel::Info, message)
}

/// Writes one line at level `warn`.
pub fn warn(message: impl AsRef<str>) {
    write(LogLevel::Warn, message)
}

/// Writes one line at level `error`.
pub fn error(message: impl AsRef<str>) {
    write(LogLevel::Error, message)
}
