//! `retoucher`: the command line (design §4.1); the commands are in [`retoucher::cli`].

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use retoucher::cli::Cli;

fn init_logging(format: &str) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,lapin=warn,lapin::channel=off,aws=warn,ort=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = match runtime.block_on(cli.dispatch()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    };
    // Stop the batching tasks, then let the model threads finish and free their sessions
    // before ONNX Runtime is torn down with the process.
    runtime.shutdown_timeout(Duration::from_secs(10));
    if !retoucher::engine::batcher::join_model_threads(Duration::from_secs(30)) {
        tracing::warn!("model threads still running at exit");
    }
    code
}
