//! The exit codes keylease's commands share, from BSD's `sysexits.h`, so that a supervisor
//! tells a mistake to fix from a resource to wait for. The README lists them.

/// Invalid command line or configuration (EX_USAGE).
pub const USAGE: u8 = 64;
/// The listen address, or a service needed, cannot be had (EX_UNAVAILABLE).
pub const UNAVAILABLE: u8 = 69;
/// The server failed while serving (EX_SOFTWARE).
pub const SOFTWARE: u8 = 70;
/// The operating system refused a resource: threads, signal handlers (EX_OSERR).
pub const OS: u8 = 71;
/// A file or the state store could not be written (EX_IOERR).
pub const IO: u8 = 74;
/// A permission is missing: to bind a port, or keylease's for a token (EX_NOPERM).
pub const NO_PERMISSION: u8 = 77;

/// The command line as `A` reads it. `--help` and `--version` end the command with success,
/// a mistake with [`USAGE`]; clap has printed either.
pub fn parse_args<A: clap::Parser>() -> Result<A, std::process::ExitCode> {
    A::try_parse().map_err(|error| {
        let _ = error.print();
        if error.use_stderr() {
            std::process::ExitCode::from(USAGE)
        } else {
            std::process::ExitCode::SUCCESS
        }
    })
}

/// The runtime a command runs on; when the system refuses one, [`OS`], said on stderr under
/// the command's name.
pub fn runtime(command: &str) -> Result<tokio::runtime::Runtime, std::process::ExitCode> {
    tokio::runtime::Runtime::new().map_err(|error| {
        eprintln!("{command}: cannot start the runtime: {error}");
        std::process::ExitCode::from(OS)
    })
}
