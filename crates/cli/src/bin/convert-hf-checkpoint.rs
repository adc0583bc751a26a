//! convert-hf-checkpoint: a Hugging Face checkpoint folder -> lit_model.safetensors +

fn main() -> std::process::ExitCode {
    loratune_cli::commands::convert_hf_checkpoint::main(std::env::args_os())
}
