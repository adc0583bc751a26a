//! One module per command. Each `main` takes the command line (argv[0] first) and returns the
//! exit code, so the same code backs the per-command binaries in `src/bin/` and the multi-call
//! `loratune` binary (one file to carry to a GPU machine instead of eight).

pub mod chat;
pub mod convert_hf_checkpoint;
pub mod download;
pub mod export;
pub mod finetune_lora;
pub mod generate;
pub mod generate_lora;
pub mod logits;
pub mod merge_lora;
pub mod prepare_alpaca;

use std::ffi::OsString;
use std::process::ExitCode;

type CommandMain = fn(Vec<OsString>) -> ExitCode;

/// Every command, by its binary name.
pub const COMMANDS: &[(&str, CommandMain)] = &[
    ("download", |a| download::main(a)),
    ("convert-hf-checkpoint", |a| convert_hf_checkpoint::main(a)),
    ("prepare-alpaca", |a| prepare_alpaca::main(a)),
    // The same command, named for data that is not Alpaca (conversations, documents).
    ("prepare", |a| prepare_alpaca::main(a)),
    ("finetune-lora", |a| finetune_lora::main(a)),
    ("generate", |a| generate::main(a)),
    ("generate-lora", |a| generate_lora::main(a)),
    ("chat", |a| chat::main(a)),
    ("merge-lora", |a| merge_lora::main(a)),
    ("export", |a| export::main(a)),
    ("logits", |a| logits::main(a)),
];

/// Looks a command up by name.
pub fn find(name: &str) -> Option<CommandMain> {
    COMMANDS.iter().find(|(n, _)| *n == name).map(|(_, f)| *f)
}
