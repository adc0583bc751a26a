//! prepare-alpaca: Alpaca-format JSON (or JSON Lines, or your own instruction data) ->

fn main() -> std::process::ExitCode {
    loratune_cli::commands::prepare_alpaca::main(std::env::args_os())
}
