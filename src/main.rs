//! The `harvest` binary: parses the command line and calls the library. The command line
//! ([`cli`]), the benchmarks behind `harvest bench` ([`bench`]) and the generated test shop
//! ([`sitegen`]) belong to the binary, not to the library's API.

mod bench;
mod cli;
// The test suite compiles this file too and uses parts of it the binary does not.
#[allow(dead_code)]
mod sitegen;

/// mimalloc instead of glibc's malloc: under `bench queue` the profile (`perf record -e
/// cpu-clock`) showed a quarter of the CPU in glibc's malloc and free, much of it waiting on its
/// arena locks (futex wake/wait), since sled and the codec allocate per key and per value on
/// every worker thread.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() {
    if let Err(e) = cli::main().await {
        // `harvest records ID | head` closes the pipe early: that is the reader's choice, not an
        // error worth a message.
        let broken_pipe = e.chain().any(|c| {
            c.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
        });
        if broken_pipe {
            std::process::exit(0);
        }
        eprintln!("harvest: {}", message(&e));
        let code = e
            .downcast_ref::<cli::client::Exit>()
            .map_or(1, |x| x.code as i32);
        std::process::exit(code);
    }
}

/// The error and its causes in one line, leaving out a cause whose text the message already
/// holds (most of harvest's errors include their source's text).
fn message(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
    }
    out
}
