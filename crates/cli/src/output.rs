//! Command output that never panics (`println!` does on a broken pipe): `outln!`/`out!`
//! write stdout, and a reader that went away (`| head`) only stops the output
//! ([`stdout_closed`]); `errln!`/`err!` write stderr and ignore failure.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Result;
use std::io::Write;

static STDOUT_CLOSED: AtomicBool = AtomicBool::new(false);

/// Whether stdout's reader went away (a broken pipe). Commands whose output is the job
/// (`generate`, `chat`) stop when it did; the others finish their work without it.
pub fn stdout_closed() -> bool {
    STDOUT_CLOSED.load(Ordering::Relaxed)
}

/// Writes to stdout and flushes. A broken pipe (`... | head -1`) is not a failure: the
/// output is dropped from then on and [`stdout_closed`] says so. Any other failure (a full
/// disk behind a redirect) is an error naming stdout.
pub fn write_stdout(args: fmt::Arguments) -> Result<()> {
    if stdout_closed() {
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    match out.write_fmt(args).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            STDOUT_CLOSED.store(true, Ordering::Relaxed);
            Ok(())
        }
        Err(e) => Err(anyhow::anyhow!("writing to stdout: {e}")),
    }
}

/// Writes to stderr, ignoring failure (there is nowhere left to report it).
pub fn write_stderr(args: fmt::Arguments) {
    let _ = std::io::stderr().lock().write_fmt(args);
}

/// `println!` for command output (see [`write_stdout`]); returns early on a write error.
macro_rules! outln {
    () => { $crate::write_stdout(format_args!("\n"))? };
    ($($arg:tt)*) => { $crate::write_stdout(format_args!("{}\n", format_args!($($arg)*)))? };
}

/// `print!` counterpart of [`outln!`].
macro_rules! out {
    ($($arg:tt)*) => { $crate::write_stdout(format_args!($($arg)*))? };
}

/// `eprintln!` that never panics.
macro_rules! errln {
    () => { $crate::write_stderr(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::write_stderr(format_args!("{}\n", format_args!($($arg)*))) };
}

/// `eprint!` that never panics.
macro_rules! err {
    ($($arg:tt)*) => { $crate::write_stderr(format_args!($($arg)*)) };
}
