//! Stopping a run cleanly: Ctrl-C (SIGINT), SIGTERM (`docker stop`, systemd, SLURM, `timeout`)
//! and SIGHUP (a closed terminal) all ask the training loop to finish the steps in flight and
//! save; the process then exits with the signal's conventional code, 128 + its number (130, 143,
//! 129). A second signal of any of them exits at once with that code.
//!
//! The handler only stores the signal's number and, the second time, calls `_exit`: both are
//! async-signal-safe. Its one message goes out through `write(2)`, which is too, and whose
//! failure (a terminal that is gone) is ignored instead of ending the process.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;

/// The first stop signal's number (0: none yet). Process-wide: there is one set of handlers.
static RECEIVED: AtomicI32 = AtomicI32::new(0);

/// What the training loop polls, set by the first stop signal.
#[derive(Clone, Debug)]
pub struct StopRequest {
    pub flag: Arc<AtomicBool>,
}

impl StopRequest {
    /// The signal that asked to stop, if one did.
    pub fn signal(&self) -> Option<i32> {
        match RECEIVED.load(Ordering::SeqCst) {
            0 => None,
            s => Some(s),
        }
    }

    /// 128 + the signal's number, the shell's convention for "ended by this signal".
    pub fn exit_code(&self) -> Option<u8> {
        self.signal().map(|s| (128 + s).clamp(0, 255) as u8)
    }
}

#[cfg(unix)]
mod imp {
    use super::*;
    use std::sync::OnceLock;

    static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();

    /// On a terminal the message starts on a line of its own (the bar, and the `^C` the terminal
    /// echoes, hold the current one); in a log it is the next line, with no blank before it.
    const MESSAGE: &[u8] =
        b"\ninterrupted: finishing the current steps, then saving (interrupt again to quit now)\n";
    /// Whether stderr is a terminal, read once when the handlers are installed (isatty is not
    /// one of the calls a signal handler may make).
    static STDERR_IS_TERMINAL: AtomicBool = AtomicBool::new(false);

    extern "C" fn on_stop_signal(signo: libc::c_int) {
        if RECEIVED.compare_exchange(0, signo, Ordering::SeqCst, Ordering::SeqCst).is_err() {
            // The second one: leave now, with this signal's code.
            unsafe { libc::_exit(128 + signo) };
        }
        if let Some(flag) = FLAG.get() {
            flag.store(true, Ordering::SeqCst);
        }
        let message = if STDERR_IS_TERMINAL.load(Ordering::SeqCst) { MESSAGE } else { &MESSAGE[1..] };
        unsafe {
            libc::write(libc::STDERR_FILENO, message.as_ptr().cast(), message.len());
        }
    }

    pub fn install() -> std::io::Result<StopRequest> {
        let flag = FLAG.get_or_init(|| Arc::new(AtomicBool::new(false))).clone();
        // SAFETY: isatty only reads the descriptor's state.
        STDERR_IS_TERMINAL.store(unsafe { libc::isatty(libc::STDERR_FILENO) } == 1, Ordering::SeqCst);
        for signo in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value; the handler
            // above only touches atomics and async-signal-safe calls.
            unsafe {
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = on_stop_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
                // Restart interrupted system calls (reads, writes) instead of failing them.
                action.sa_flags = libc::SA_RESTART;
                libc::sigemptyset(&mut action.sa_mask);
                if libc::sigaction(signo, &action, std::ptr::null_mut()) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
        }
        Ok(StopRequest { flag })
    }
}

#[cfg(not(unix))]
mod imp {
    use super::*;

    pub fn install() -> std::io::Result<StopRequest> {
        let flag = Arc::new(AtomicBool::new(false));
        let handler_flag = flag.clone();
        ctrlc::set_handler(move || {
            const SIGINT: i32 = 2;
            if RECEIVED.compare_exchange(0, SIGINT, Ordering::SeqCst, Ordering::SeqCst).is_err() {
                std::process::exit(128 + SIGINT);
            }
            handler_flag.store(true, Ordering::SeqCst);
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "\ninterrupted: finishing the current steps, then saving (Ctrl-C again to quit now)"
            );
        })
        .map_err(std::io::Error::other)?;
        Ok(StopRequest { flag })
    }
}

/// Installs the handlers for SIGINT, SIGTERM and SIGHUP (Ctrl-C only where there are no unix
/// signals). Call once, before training starts.
pub fn install_stop_handlers() -> std::io::Result<StopRequest> {
    imp::install()
}
