//! How `lenet` writes (a module of the binary, declared in main.rs; not part of the library).
//!
//! - What a subcommand reports goes to stdout; notices (which backend, warnings) go to stderr.
//! - With `--json`, stdout holds exactly one JSON document, on one line, and every line meant
//!   for people goes to stderr instead, so `lenet eval --json | jq .accuracy` works.
//! - Writing never panics (`println!` does when its stream fails). A stdout whose reader went
//!   away (`lenet eval | head -1`: EPIPE) is no error: the rest of the output is dropped and the
//!   command ends as it would have. Any other failure to write stdout (a full disk) is reported
//!   at the end and makes the exit status non-zero. A failure to write stderr (a terminal gone
//!   after SIGHUP) is ignored: there is nobody left to tell.

use std::io::{self, Write};
use std::process::ExitCode;

/// The output of one subcommand.
pub struct Output {
    json: bool,
    /// Nothing more goes to stdout: its reader went away, or writing it failed.
    stdout_done: bool,
    /// The first failure to write stdout other than a closed reader.
    failed: Option<io::Error>,
}

impl Output {
    /// `json`: the subcommand's `--json`; its human lines then go to stderr.
    pub fn new(json: bool) -> Self {
        Output { json, stdout_done: false, failed: None }
    }

    /// A line for people: on stdout, or on stderr under `--json`.
    pub fn line(&mut self, line: impl AsRef<str>) {
        let mut text = line.as_ref().to_string();
        text.push('\n');
        self.text(&text);
    }

    /// Text for people as it is (a table): on stdout, or on stderr under `--json`.
    pub fn text(&mut self, text: &str) {
        if self.json {
            notice_text(text);
        } else {
            self.stdout(text.as_bytes());
        }
    }

    /// The `--json` document, on one line of stdout. Call once, and only under `--json`.
    pub fn document<T: serde::Serialize>(&mut self, document: &T) -> anyhow::Result<()> {
        debug_assert!(self.json, "a JSON document without --json");
        let mut text = serde_json::to_string(document)?;
        text.push('\n');
        self.stdout(text.as_bytes());
        Ok(())
    }

    /// Bytes that are the command's product whatever `--json` says (a completion script, a
    /// man page): always stdout.
    pub fn product(&mut self, bytes: &[u8]) {
        self.stdout(bytes);
    }

    fn stdout(&mut self, bytes: &[u8]) {
        if self.stdout_done {
            return;
        }
        let mut out = io::stdout().lock();
        if let Err(e) = out.write_all(bytes).and_then(|()| out.flush()) {
            self.stdout_done = true;
            if e.kind() != io::ErrorKind::BrokenPipe {
                self.failed.get_or_insert(e);
            }
        }
    }

    /// The exit status: `code`, unless writing stdout failed for another reason than a closed
    /// reader (then one error line, and a failure status if `code` was a success).
    pub fn finish(self, code: ExitCode) -> ExitCode {
        match self.failed {
            None => code,
            Some(e) => {
                notice(format!("error: cannot write the output to stdout: {e}"));
                if code == ExitCode::SUCCESS {
                    ExitCode::FAILURE
                } else {
                    code
                }
            }
        }
    }
}

/// One line on stderr, whatever `--json` says; a failure to write it is ignored.
pub fn notice(line: impl AsRef<str>) {
    let _ = writeln!(io::stderr(), "{}", line.as_ref());
}

fn notice_text(text: &str) {
    let _ = io::stderr().write_all(text.as_bytes());
}
