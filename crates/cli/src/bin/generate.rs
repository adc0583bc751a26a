//! generate: answer an instruction with the base model (no adapter).

fn main() -> std::process::ExitCode {
    loratune_cli::commands::generate::main(std::env::args_os())
}
