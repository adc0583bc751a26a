//! chat: an interactive conversation with a checkpoint (and optionally a LoRA adapter).

fn main() -> std::process::ExitCode {
    loratune_cli::commands::chat::main(std::env::args_os())
}
