//! export: a checkpoint (optionally with a LoRA adapter) as a Hugging Face model folder that

fn main() -> std::process::ExitCode {
    loratune_cli::commands::export::main(std::env::args_os())
}
