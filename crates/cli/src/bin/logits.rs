//! logits: the next-token logits a checkpoint gives for a token sequence, printed as a summary

fn main() -> std::process::ExitCode {
    loratune_cli::commands::logits::main(std::env::args_os())
}
