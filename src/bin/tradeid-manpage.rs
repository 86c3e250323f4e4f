//! Writes tradeid's man pages, generated from its clap definitions:
//! `tradeid.1` and one `tradeid-SUBCOMMAND.1` per subcommand, into the
//! directory given (for the Debian package; see packaging/build-deb.sh).

use std::path::PathBuf;

use clap::CommandFactory;

fn main() -> std::io::Result<()> {
    let dir = PathBuf::from(std::env::args_os().nth(1).unwrap_or_else(|| "target/man".into()));
    std::fs::create_dir_all(&dir)?;
    let command = tradeid_server::Cli::command();
    write(&dir, "tradeid", command.clone())?;
    for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
        // clap names are &'static str; this one-shot program leaks a few.
        let name: &'static str = Box::leak(format!("tradeid-{}", sub.get_name()).into_boxed_str());
        write(&dir, name, sub.clone().name(name))?;
    }
    Ok(())
}

fn write(dir: &std::path::Path, name: &str, command: clap::Command) -> std::io::Result<()> {
    let mut page = Vec::new();
    clap_mangen::Man::new(command).render(&mut page)?;
    std::fs::write(dir.join(format!("{name}.1")), page)
}
