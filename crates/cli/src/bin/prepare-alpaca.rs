//! prepare-alpaca: training data (Alpaca records, conversations or documents) -> tokenized
//! train/val splits.

fn main() -> std::process::ExitCode {
    loratune_cli::commands::prepare_alpaca::main(std::env::args_os())
}
