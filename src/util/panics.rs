//! A panic caught where one is survivable: loading a model.
//!
//! The process's policy is that a panic is fatal (`main` installs a hook that aborts, so
//! systemd restarts the daemon whole rather than leaving it with a dead stage). Loading a
//! model is the one place where a panic means "this file is bad", not "this process is
//! broken": tract panics on some malformed graphs (a division by zero in its padding
//! code for stride 0, an index into an empty scale tensor), and a reload onto such a file
//! must leave the running daemon as it was. [`catching`] marks the current thread so that
//! the hook records the panic instead of aborting, and turns the unwinding into an error.
//! Only the calling thread is marked: a panic on another thread (a thread pool's worker)
//! stays fatal, so the code run inside must stay on this thread.

use std::cell::{Cell, RefCell};
use std::panic::{AssertUnwindSafe, PanicHookInfo};

thread_local! {
    static CATCHING: Cell<bool> = const { Cell::new(false) };
    static CAUGHT: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// A panic that [`catching`] turned into an error.
#[derive(Debug, thiserror::Error)]
#[error("a panic while {what} (a bug this file triggers; please report it): {message}")]
pub struct Panicked {
    pub what: &'static str,
    /// The panic's message and where it was raised.
    pub message: String,
}

/// Run `f`; a panic inside it (on this thread) becomes `Err(Panicked)`.
pub fn catching<R>(what: &'static str, f: impl FnOnce() -> R) -> Result<R, Panicked> {
    let outer = CATCHING.with(|c| c.replace(true));
    let result = std::panic::catch_unwind(AssertUnwindSafe(f));
    CATCHING.with(|c| c.set(outer));
    result.map_err(|payload| {
        let recorded = CAUGHT.with(|c| c.borrow_mut().take());
        let message = recorded.unwrap_or_else(|| payload_text(payload.as_ref()));
        Panicked { what, message }
    })
}

/// The process's panic policy, installed first thing by `main`: a panic anywhere is fatal.
/// It is printed (with the default hook's message and location), then the process aborts
/// (SIGABRT), so systemd restarts the daemon whole instead of leaving it with a dead stage.
/// Except inside [`catching`]: there the panic is recorded and unwinds into an error.
///
/// Not `panic = "abort"` in the profile: libjpeg's errors unwind out of the C decoder and
/// are caught as errors (src/frame/mod.rs); that unwinding does not call this hook.
pub fn abort_on_panic() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if absorb(info) {
            return;
        }
        report(info);
        std::process::abort();
    }));
}

/// For the process's panic hook: if this thread is inside [`catching`], remember the
/// panic (message and location) and return true, so that the hook lets it unwind instead
/// of aborting.
pub fn absorb(info: &PanicHookInfo) -> bool {
    if !CATCHING.with(Cell::get) {
        return false;
    }
    let mut text = payload_text(info.payload());
    if let Some(l) = info.location() {
        text.push_str(&format!(" (at {}:{})", l.file(), l.line()));
    }
    CAUGHT.with(|c| *c.borrow_mut() = Some(text));
    true
}

fn payload_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_inside_becomes_an_error_and_the_mark_is_lifted() {
        let v: Vec<u32> = Vec::new();
        let i = v.len();
        let err = catching("testing", || v[i]).unwrap_err();
        assert_eq!(err.what, "testing");
        assert!(err.message.contains("index out of bounds"), "{err}");
        assert!(!CATCHING.with(Cell::get));
        assert_eq!(catching("testing", || 7).unwrap(), 7);
    }
}
