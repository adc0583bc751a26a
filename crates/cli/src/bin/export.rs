//! export: a checkpoint (optionally with a LoRA adapter) for transformers or PEFT.

fn main() -> std::process::ExitCode {
    loratune_cli::commands::export::main(std::env::args_os())
}
