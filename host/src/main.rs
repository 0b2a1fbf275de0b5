//! The `sluicegate` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

/// mimalloc: the proxy allocates small, short-lived buffers on every
/// request, where it is markedly faster than glibc's allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
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
        /// Also compile and init every filter the config's routes name,
        /// with its config and policy, as the proxy would.
        #[arg(long)]
        filters: bool,
    },
    /// Work with one filter component, without a proxy.
    Filter {
        #[command(subcommand)]
        command: FilterCommand,
    },
    /// Run the demo: two local backends on 9001/9002 and the proxy on 8080
    /// with the example filters.
    Demo {
        /// Where the built example filters are.
        #[arg(long, default_value = "target/filters")]
        filters: PathBuf,
    },
}

#[derive(Subcommand)]
enum FilterCommand {
    /// Run a filter against a sample request (and response) and print the
    /// action and the edited heads.
    Test {
        /// The filter component (`.wasm`).
        wasm: PathBuf,
        #[command(flatten)]
        sample: SampleArgs,
    },
    /// Measure the cost of one request through the phases the filter asks
    /// for, on a warm (pooled) and on a fresh instance.
    Bench {
        /// The filter component (`.wasm`).
        wasm: PathBuf,
        /// Calls to time on a warm instance.
        #[arg(long, default_value_t = 20000)]
        calls: u64,
        #[command(flatten)]
        sample: SampleArgs,
    },
}

#[derive(clap::Args)]
struct SampleArgs {
    /// The filter's config: a TOML file holding its `[filters.config.<name>]` table.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The request line, e.g. 'GET /path?x=1'.
    #[arg(long, default_value = "GET /")]
    request: String,
    /// A request header, 'name: value' (repeatable).
    #[arg(short = 'H', long = "header")]
    headers: Vec<String>,
    /// The client's address, 'ip:port' (default 127.0.0.1:40000).
    #[arg(long)]
    client: Option<String>,
    /// The request body, for a filter with a request-body phase.
    #[arg(long)]
    body: Option<String>,
    /// Run the response phase with a response of this status.
    #[arg(long)]
    response: Option<u16>,
    /// A response header, 'name: value' (repeatable).
    #[arg(long = "response-header")]
    response_headers: Vec<String>,
    /// The response body, for a filter with a response-body phase.
    #[arg(long)]
    response_body: Option<String>,
}

impl SampleArgs {
    fn sample(&self) -> sluicegate::filter::tool::Sample {
        sluicegate::filter::tool::Sample {
            request: self.request.clone(),
            headers: self.headers.clone(),
            client: self.client.clone(),
            body: self.body.clone().map(String::into_bytes),
            response_status: self.response,
            response_headers: self.response_headers.clone(),
            response_body: self.response_body.clone().map(String::into_bytes),
        }
    }
}

fn filter_command(cmd: FilterCommand) -> anyhow::Result<()> {
    use sluicegate::config::Isolation;
    use sluicegate::filter::tool;
    match cmd {
        FilterCommand::Test { wasm, sample } => {
            let v = tool::load(&wasm, sample.config.as_deref(), Isolation::Pool)?;
            tool::test(&v, &sample.sample())
        }
        FilterCommand::Bench {
            wasm,
            calls,
            sample,
        } => {
            let warm = tool::load(&wasm, sample.config.as_deref(), Isolation::Pool)?;
            let w = tool::bench(&warm, &sample.sample(), calls)?;
            let fresh = tool::load(&wasm, sample.config.as_deref(), Isolation::Request)?;
            let f = tool::bench(&fresh, &sample.sample(), (calls / 20).max(100))?;
            println!(
                "{}: warm instance {w:.2} us/request, fresh instance {f:.2} us/request",
                wasm.display()
            );
            Ok(())
        }
    }
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
        Command::Check { config, filters } => match Config::load(&config) {
            Ok(c) => {
                let checked = if filters {
                    sluicegate::filter::check_filters(&c)
                } else {
                    Ok(0)
                };
                checked.map(|n| {
                    let extra = if filters {
                        format!(", {n} filters compiled and initialised")
                    } else {
                        String::new()
                    };
                    println!(
                        "{}: ok ({} upstreams, {} routes{extra})",
                        config.display(),
                        c.upstreams.len(),
                        c.routes.len()
                    );
                })
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
        Command::Filter { command } => filter_command(command),
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
