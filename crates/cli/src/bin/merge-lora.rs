//! merge-lora: fold a LoRA adapter into the base weights and write a standalone checkpoint.

fn main() -> std::process::ExitCode {
    loratune_cli::commands::merge_lora::main(std::env::args_os())
}
