//! Log output: human-readable on a terminal, journald-friendly under
//! systemd (no timestamps or colours, and a `<N>` syslog priority prefix
//! that journald turns into the entry's priority). Never per datagram.
//! Also the one line a fatal error is printed as.

use std::fmt;
use std::io::Write;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::{DefaultFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. The level comes from `TRADEID_LOG`
/// (e.g. `debug`, `tradeid=trace`), default `info`.
pub fn init() {
    let filter = EnvFilter::try_from_env("TRADEID_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if under_journald() {
        let _ = builder.with_ansi(false).event_format(Journald).fmt_fields(DefaultFields::new()).try_init();
    } else {
        let _ = builder.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).try_init();
    }
}

/// Prints a fatal error, once: `tradeid: error: MESSAGE` on a terminal;
/// under systemd every line carries the error priority `<3>`, so the
/// journal records it as an error entry. A failed write is ignored (stderr
/// may be closed too); this never panics.
pub(crate) fn fatal(message: &str) {
    let prefix = if under_journald() { "<3>" } else { "" };
    let mut text = String::with_capacity(message.len() + 32);
    for (i, line) in message.lines().enumerate() {
        text.push_str(prefix);
        if i == 0 {
            text.push_str("tradeid: error: ");
        }
        text.push_str(line);
        text.push('\n');
    }
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}

/// Whether stderr goes to the journal: systemd sets `JOURNAL_STREAM` when
/// it connects stderr to the journal.
fn under_journald() -> bool {
    std::env::var_os("JOURNAL_STREAM").is_some()
}

/// `<priority>message key=value ...`, one line per event.
struct Journald;

impl<S, N> FormatEvent<S, N> for Journald
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let priority = match *event.metadata().level() {
            Level::ERROR => 3,
            Level::WARN => 4,
            Level::INFO => 6,
            Level::DEBUG | Level::TRACE => 7,
        };
        write!(writer, "<{priority}>")?;
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}
