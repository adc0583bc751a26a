//! generate-lora: answer an instruction with a finetuned LoRA adapter merged into the base.

fn main() -> std::process::ExitCode {
    loratune_cli::commands::generate_lora::main(std::env::args_os())
}
