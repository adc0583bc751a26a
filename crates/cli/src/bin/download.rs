//! download: fetch a model from the Hugging Face Hub into checkpoints/<org>/<name>/ (with

fn main() -> std::process::ExitCode {
    loratune_cli::commands::download::main(std::env::args_os())
}
