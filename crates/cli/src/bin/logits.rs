//! logits: the next-token logits a checkpoint gives for a token sequence.

fn main() -> std::process::ExitCode {
    loratune_cli::commands::logits::main(std::env::args_os())
}
