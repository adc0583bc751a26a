//! loratune: every command in one binary (`loratune finetune-lora ...`), for machines where one
//! file is easier to carry than eight (the CUDA build is ~50 MB per binary). Called through a
//! link named after a command (`ln -s loratune finetune-lora`), it runs that command.

use std::ffi::OsString;
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use loratune_cli::commands::{find, COMMANDS};

fn main() -> ExitCode {
    let mut argv: Vec<OsString> = std::env::args_os().collect();
    let invoked = argv
        .first()
        .and_then(|a| Path::new(a).file_name())
        .and_then(|n| n.to_str())
        .unwrap_or("loratune")
        .to_string();
    if let Some(cmd) = find(&invoked) {
        return cmd(argv);
    }
    let names: Vec<&str> = COMMANDS.iter().map(|(n, _)| *n).collect();
    let Some(sub) = argv.get(1).and_then(|s| s.to_str()).map(str::to_string) else {
        let _ = writeln!(
            std::io::stderr(),
            "usage: loratune <command> [flags]\ncommands: {}",
            names.join(", ")
        );
        return ExitCode::FAILURE;
    };
    match sub.as_str() {
        "-h" | "--help" | "help" => {
            let _ = writeln!(
                std::io::stdout(),
                "usage: loratune <command> [flags]\ncommands: {}",
                names.join(", ")
            );
            ExitCode::SUCCESS
        }
        "-V" | "--version" => {
            let _ = writeln!(std::io::stdout(), "loratune {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        _ => match find(&sub) {
            Some(cmd) => {
                argv.remove(0);
                cmd(argv)
            }
            None => {
                let _ = writeln!(
                    std::io::stderr(),
                    "error: unknown command {sub:?}; expected one of: {}",
                    names.join(", ")
                );
                ExitCode::FAILURE
            }
        },
    }
}
