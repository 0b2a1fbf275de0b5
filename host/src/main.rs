//! The `sluicegate` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use sluicegate::config::Config;

#[derive(Parser)]
#[command(
    name = "sluicegate",
    version,
    about = "A reverse proxy and load balancer with sandboxed WebAssembly filters"
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Serve with a config file.
    Run {
        /// The TOML config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config file and exit (0 when valid).
    Check {
        /// The TOML config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run the demo: two local backends on 9001/9002 and the proxy on 8080
    /// with the example filters.
    Demo {
        /// Where the built example filters are.
        #[arg(long, default_value = "target/filters")]
        filters: PathBuf,
    },
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SLUICEGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logs(cli.log_format);
    let result = match cli.command {
        Command::Check { config } => match Config::load(&config) {
            Ok(c) => {
                println!(
                    "{}: ok ({} upstreams, {} routes)",
                    config.display(),
                    c.upstreams.len(),
                    c.routes.len()
                );
                Ok(())
            }
            Err(e) => Err(anyhow::Error::from(e)),
        },
        Command::Run { config } => {
            Config::load(&config)
                .map_err(anyhow::Error::from)
                .and_then(|c| {
                    let rt = sluicegate::app::runtime(&c)?;
                    rt.block_on(sluicegate::app::serve(c, Some(config)))
                })
        }
        Command::Demo { filters } => sluicegate::demo::demo_config(&filters).and_then(|c| {
            let rt = sluicegate::app::runtime(&c)?;
            rt.block_on(async {
                sluicegate::demo::start_backends().await?;
                sluicegate::app::serve(c, None).await
            })
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
