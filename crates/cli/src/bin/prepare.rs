//! prepare: prepare-alpaca under the name that fits data that is not Alpaca (conversations in
//! `messages` or ShareGPT form, plain documents).

fn main() -> std::process::ExitCode {
    loratune_cli::commands::prepare_alpaca::main(std::env::args_os())
}
