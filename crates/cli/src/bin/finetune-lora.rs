//! finetune-lora: train LoRA adapters on a dataset made by prepare-alpaca.

fn main() -> std::process::ExitCode {
    loratune_cli::commands::finetune_lora::main(std::env::args_os())
}
