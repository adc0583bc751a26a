//! Stop signals for long runs: the first SIGINT (Ctrl-C), SIGTERM (`kill`, `timeout`, Slurm,
//! Kubernetes) or SIGHUP asks the run to finish its step, save and exit with 128 + the
//! signal's number; a second one quits at once (the last checkpoint stays valid: every file
//! is written atomically).

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

static STOP: AtomicBool = AtomicBool::new(false);
static SIGNAL: AtomicI32 = AtomicI32::new(0);

#[cfg(unix)]
extern "C" fn on_signal(sig: libc::c_int) {
    // Only async-signal-safe calls here: atomics, write(2), _exit(2).
    if SIGNAL.swap(sig, Ordering::SeqCst) != 0 {
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(128 + sig) };
    }
    STOP.store(true, Ordering::SeqCst);
    let msg: &[u8] = match sig {
        libc::SIGINT => b"\nCtrl-C: finishing this step and saving (press it again to quit now)\n",
        libc::SIGTERM => b"\nSIGTERM: finishing this step and saving (send it again to quit now)\n",
        _ => b"\nSIGHUP: finishing this step and saving (send it again to quit now)\n",
    };
    // SAFETY: write(2) on stderr with a valid buffer; the result is deliberately ignored.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
    }
}

/// Installs the handlers; returns the flag they set.
pub fn install() -> std::io::Result<&'static AtomicBool> {
    #[cfg(unix)]
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: a zeroed sigaction with a valid handler and an empty mask is well formed;
        // the handler only touches atomics and async-signal-safe calls.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            if libc::sigaction(sig, &action, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok(&STOP)
}

/// The exit status after a run that stopped for a signal: 128 + its number (130 for
/// Ctrl-C, 143 for SIGTERM), as a shell reports a process killed by it.
pub fn exit_code() -> ExitCode {
    match SIGNAL.load(Ordering::SeqCst) {
        0 => ExitCode::SUCCESS,
        sig => ExitCode::from((128 + sig).clamp(0, 255) as u8),
    }
}
