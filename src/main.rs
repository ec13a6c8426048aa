//! The `harvest` binary: parses the command line and calls the library.

#[tokio::main]
async fn main() {
    if let Err(e) = harvest::cli::main().await {
        eprintln!("harvest: {e:#}");
        std::process::exit(1);
    }
}
