//! filemapd's command line. Installed as `dmfilemapd` it takes exactly lvm2's arguments:
//! `dmfilemapd <fd> <group_id> <abs_path> <mode> [<foreground>[<verbose>]]`. As `filemapd` it
//! takes the same arguments plus flags, and `filemapd show FILE [GROUP_ID]` prints a file's
//! extents beside its group's regions.
use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
use clap::{CommandFactory as _, Parser, Subcommand};
use filemapd::{
    daemon::args::{self, DaemonArgs},
    daemon::daemonize::daemonize,
    daemon::logging,
    daemon::monitor::Monitor,
    daemon::regions::Regions,
    oneshot,
    reconcile::Mapping,
    stats,
    wake::ebpf::{Hub, Tracer, counting, one_file_tables, tables_size},
    wake::notify::Notifier,
};

#[derive(Parser)]
#[command(
    version,
    about = "Keep a file's dm-stats region group in step with its extents",
    long_about = "Keep a file's dm-stats region group in step with its extents.\n\nA drop-in for lvm2's dmfilemapd: installed as dmfilemapd, it takes lvm2's arguments and dmstats starts it for `dmstats create --filemap`. Like lvm2's daemon it exits when its group is deleted, or when its file has no extents left (see filemapd-watch(8) for a service that outlives any one file).\n\nWith a `filemapd watch --handoff` service running, the daemon hands its file to the service and exits. It looks for the service on /run/filemapd/handoff.sock, or on the socket FILEMAPD_HANDOFF_SOCKET names (for a service whose config sets handoff_socket), and hands its file only to a service running as root or as its own user.",
    override_usage = "filemapd [OPTIONS] <fd> <group_id> <abs_path> <inode|path> [<foreground> [<verbose>]]\n       filemapd watch [--config <FILE>] [PATH...] [--ebpf] [--regions tiled|exact|none] [--io-hook dm-stats|bio] [--kernel-map-extents <N>] [--interval <S>] [--metrics <ADDR>] [--handoff] [--check-config] [-v...]\n       filemapd map <FILE> [--alias A] [--program-id P] [--precise] [--bounds B]\n       filemapd unmap <FILE>\n       filemapd show <FILE> [GROUP_ID]\n       filemapd report [FILE...]\n       filemapd top [--metrics ADDR] [--interval S] [--sort COLUMN] [--batch N]",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Seconds between checks of the file and the group (lvm2: 0.5).
    #[arg(long, default_value = "0.5", value_parser = parse_interval)]
    interval: Duration,
    /// Wake on the kernel's block-allocation events (eBPF) instead of polling; falls back to
    /// polling with a warning where eBPF cannot be used. Also set by FILEMAPD_EBPF=1.
    #[arg(long)]
    ebpf: bool,
    /// Keep lvm2's mapping, one region per extent: a grown extent's region is replaced and
    /// its counters lost. Default: regions tile the extents and keep their counters. Also set
    /// by FILEMAPD_EXACT=1.
    #[arg(long)]
    exact: bool,
    /// dmfilemapd's positional arguments.
    #[arg(value_name = "ARGS")]
    daemon_args: Vec<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Monitor many files and directories in one process
    ///
    /// PATHs, and the `[[path]]` tables of a CONFIG named *.toml, name files or directories,
    /// whose files get groups as dmstats makes them; `[[group]]` tables (or, in a CONFIG of
    /// another name, lines `<group_id> <inode|path> <path>`) name groups made beforehand.
    ///
    /// Runs in the foreground until every file named is gone, or, with a directory to watch,
    /// until SIGTERM. SIGHUP reads CONFIG again (files it no
    /// longer names are let go, their groups kept; new ones are watched); SIGTERM stops every
    /// monitor between passes and exits 0, leaving the kernel's counting programs pinned under
    /// /sys/fs/bpf/filemapd/PID/links: they count the files' IO until the next start (a
    /// restart, an upgrade) takes the counting over and unpins them. A file that cannot be
    /// watched is said and skipped.
    /// CONFIG must not be writable by other users. As a systemd service (Type=notify) it
    /// reports ready once every file is watched.
    Watch {
        /// What to watch: TOML (*.toml; see /etc/filemapd/watch.toml) or the line format.
        #[arg(long, required_unless_present = "paths")]
        config: Option<PathBuf>,
        /// Files, or directories whose regular files are all watched; each file gets the group
        /// it has, or one made as `dmstats create --filemap` makes it.
        paths: Vec<PathBuf>,
        /// Keep the group of a file a PATH named when the file is deleted (default: the group
        /// goes with it, once no process holds the file).
        #[arg(long)]
        keep_groups: bool,
        /// How PATHs' files are followed: by inode (default), or by path (a file renamed
        /// over one is followed in its place), as a `[[path]]`'s `follow`.
        #[arg(long, value_enum, value_name = "HOW")]
        follow: Option<args::FollowMode>,
        /// For the groups made for PATHs' files (--alias: one file PATH only), as a
        /// `[[path]]`'s; --bounds also sets the kernel histogram's bounds.
        #[command(flatten)]
        made: GroupOptions,
        /// Wake on the kernel's block-allocation events (eBPF); falls back to polling.
        #[arg(long)]
        ebpf: bool,
        /// Where each file's counters live besides the kernel's: a dmstats group whose
        /// regions tile its extents (tiled, the default), one region per extent as lvm2 maps
        /// (exact), or no regions at all (none: the kernel's counters alone, which needs eBPF
        /// and the kernel's BTF; --ebpf is then implied). A `[[path]]`'s `regions` overrides it
        /// for its files; groups made beforehand keep their regions.
        #[arg(long, value_enum, value_name = "MODE")]
        regions: Option<Regions>,
        /// Another spelling of --regions exact.
        #[arg(long)]
        exact: bool,
        /// Which kernel programs count the files' IO (default: dm-stats where dm-mod has BTF,
        /// else bio). Over a TOML config's `io_hook`; implies --ebpf; the start fails where
        /// the hook asked for cannot run.
        #[arg(long, value_enum, value_name = "HOOK")]
        io_hook: Option<filemapd::wake::ebpf::IoHook>,
        /// How many file extents the kernel's sector map (the counting's) is sized for,
        /// scattered as badly as they can be (default 50,000: 27 MB of the kernel's memory,
        /// mapped into the daemon; the tables double at each power of two, up to 3,000,000:
        /// 1.7 GB). Past it some runs of sectors may find no room: the daemon warns, and
        /// their IO is not counted (`filemapd_file_uncounted_runs`). Over a TOML config's
        /// `kernel_map_extents`.
        #[arg(long, value_name = "N", value_parser = parse_map_extents)]
        kernel_map_extents: Option<u32>,
        /// Seconds between checks (eBPF: only for deleted groups and unlinked files).
        #[arg(long, default_value = "0.5", value_parser = parse_interval)]
        interval: Duration,
        /// Serve per-file IO and the daemon's health to Prometheus at http://ADDR/metrics
        /// (e.g. 127.0.0.1:9101), read at each scrape; over a TOML config's `metrics = "ADDR"`
        /// (with `metrics_remote = true` for an address other hosts can reach).
        #[arg(long, value_name = "ADDR")]
        metrics: Option<std::net::SocketAddr>,
        /// Allow --metrics on an address other hosts can reach.
        #[arg(long, requires = "metrics")]
        metrics_remote: bool,
        /// Take over the files of dmfilemapd daemons that Debian's dmstats starts: they hand
        /// their file over (on /run/filemapd/handoff.sock, or the TOML config's
        /// handoff_socket) and exit, so one process and one set of eBPF programs serve the
        /// host. Also set by the config's `handoff = true`.
        #[arg(long)]
        handoff: bool,
        /// Print what the config and PATHs would have watched, and how, then exit: 0 when
        /// every file can be watched and the watch would start, 1 otherwise (a config error
        /// names its line). Where the watch would use eBPF, its programs are loaded for a
        /// moment to say whether they can run here. Nothing is made or changed.
        #[arg(long)]
        check_config: bool,
        /// Log more: -v info, -vv debug, -vvv trace.
        #[arg(short, long, action = clap::ArgAction::Count)]
        verbose: u8,
    },
    /// Print a file's allocation events and passes as JSON
    ///
    /// For kernel labs: watch FILEs with the eBPF trigger and print, as JSON lines on stdout,
    /// each allocation or removal event of theirs (tracepoint, inode, logical and physical
    /// range, kernel time), each pass the daemon made (the bytes it read with FIEMAP, regions
    /// created and deleted, event-to-region time), and at the end (SIGTERM or Ctrl-C) each
    /// file's IO as the kernel counted it. Files get the group they have, or one made as
    /// dmstats makes it; groups are kept. Where a FILE is not on device-mapper (a plain
    /// disk), no region can exist: the events are printed, each followed by the file's
    /// extents as FIEMAP reads them.
    Trace {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Also log what the eBPF programs' filter kept or dropped, and why (aya-log; on
        /// stderr, with the daemon's log).
        #[arg(long)]
        ebpf_log: bool,
        /// Log more on stderr: -v info, -vv debug, -vvv trace.
        #[arg(short, long, action = clap::ArgAction::Count)]
        verbose: u8,
    },
    /// Map a file into a new region group, without a daemon
    ///
    /// As `dmstats create --filemap --nomonitor` does (a file that has a group keeps it); for
    /// hosts whose dmstats lacks --filemap, and for scripts.
    Map {
        /// The file (on a device-mapper device).
        path: PathBuf,
        #[command(flatten)]
        made: GroupOptions,
    },
    /// Delete the group that maps a file.
    Unmap {
        /// The file.
        path: PathBuf,
    },
    /// Write the manual pages (filemapd.8, filemapd-watch.8, ...) into DIR, for installers.
    #[command(hide = true)]
    ManPages { dir: PathBuf },
    /// Print files' IO as the kernel counted it
    ///
    /// Each FILE's IO, all of it whatever its regions, under dmstats report's column names;
    /// without FILEs, every file a running daemon counts. Clears nothing.
    Report {
        /// The files (default: every file a daemon counts in the kernel).
        paths: Vec<PathBuf>,
    },
    /// Show the watched files' IO live, like iotop for images
    ///
    /// Reads a `filemapd watch --metrics` endpoint every interval and shows per file: MB/s
    /// and IOPS read and written, latency p50/p99 from its histogram, IOs in flight, regions,
    /// how its regions follow it, who counts its IO and how it is woken. Keys: s sorts by the
    /// next column, r reverses, q quits.
    Top {
        /// The endpoint's address (the service's, as its config names it).
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9731")]
        metrics: String,
        /// Seconds between readings.
        #[arg(long, default_value = "2", value_parser = parse_interval)]
        interval: Duration,
        /// The column sorted by at start.
        #[arg(long, value_enum, default_value = "mbps")]
        sort: filemapd::top::SortBy,
        /// Print N plain tables, one each interval, and exit (no terminal needed).
        #[arg(long, value_name = "N")]
        batch: Option<u32>,
    },
    /// Print a file's extents beside its group's regions
    ///
    /// The file's extents (FIEMAP, in sectors of its dm device) beside its group's regions,
    /// the group's dm-stats totals, and the file's IO as a running daemon counted it in the
    /// kernel.
    Show {
        /// The file.
        path: PathBuf,
        /// The group to compare with; default: the first group whose regions lie in the file.
        group_id: Option<u64>,
    },
}

fn parse_map_extents(text: &str) -> Result<u32, String> {
    let extents: u32 = text
        .parse()
        .map_err(|_| format!("not a number of extents: {text}"))?;
    filemapd::wake::ebpf::check_map_extents(extents).map_err(|e| e.to_string())
}

fn parse_interval(text: &str) -> Result<Duration, String> {
    let seconds: f64 = text
        .parse()
        .map_err(|_| format!("not a number of seconds: {text}"))?;
    if !(0.01..=3600.0).contains(&seconds) {
        return Err(format!("interval {seconds} s is outside 0.01..3600"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// How a group filemapd makes is made (`dmstats create`'s options).
#[derive(clap::Args)]
struct GroupOptions {
    /// The group's alias (default: the file's name).
    #[arg(long)]
    alias: Option<String>,
    /// The regions' program id.
    #[arg(long, default_value = "dmstats")]
    program_id: String,
    /// Nanosecond timestamps (dm-stats' precise_timestamps).
    #[arg(long)]
    precise: bool,
    /// Latency histogram bounds, e.g. 1ms,5ms,20ms (ns, us, ms, s; no unit: ms).
    #[arg(long)]
    bounds: Option<String>,
}

impl GroupOptions {
    /// The regions' settings, the bounds checked.
    fn settings(&self) -> anyhow::Result<stats::RegionSettings> {
        let histogram = match &self.bounds {
            Some(bounds) => oneshot::parse_bounds(bounds, self.precise).context("--bounds")?,
            None => Vec::new(),
        };
        Ok(stats::RegionSettings {
            precise_timestamps: self.precise,
            histogram,
        })
    }
}

/// The command line's PATHs, each with its options, checked as a `[[path]]`'s are.
fn path_specs(
    paths: &[PathBuf],
    keep_group: bool,
    follow: args::FollowMode,
    made: GroupOptions,
) -> anyhow::Result<Vec<filemapd::daemon::watch::PathSpec>> {
    use filemapd::daemon::watch::{PathSpec, one_word};
    if made.alias.is_some() && (paths.len() != 1 || paths[0].is_dir()) {
        anyhow::bail!("--alias names the group of one file: give exactly one PATH, a file");
    }
    one_word("--alias", made.alias.as_deref())?;
    one_word("--program-id", Some(&made.program_id))?;
    let settings = made.settings()?;
    Ok(paths
        .iter()
        .map(|path| PathSpec {
            path: path.clone(),
            follow,
            keep_group,
            alias: made.alias.clone(),
            program_id: made.program_id.clone(),
            settings: settings.clone(),
            regions: None,
        })
        .collect())
}

/// The name the program was started as (`dmfilemapd` when dmstats starts it).
fn invoked_as() -> &'static str {
    static NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    NAME.get_or_init(|| {
        std::env::args()
            .next()
            .and_then(|a| a.rsplit('/').next().map(str::to_string))
            .unwrap_or_default()
    })
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    if invoked_as() == "dmfilemapd" {
        return match args::parse(&argv[1..]) {
            Ok(args) => run_daemon(
                &args,
                Duration::from_millis(500),
                ebpf_from_env(),
                mapping(false),
            ),
            Err(e) => fail(&e.to_string()),
        };
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        // One line and exit 1, like every other bad invocation.
        Err(e) => return fail(&clap_error_line(&e.to_string())),
    };
    match cli.command {
        Some(Command::Watch {
            config,
            paths,
            keep_groups,
            follow,
            made,
            ebpf,
            regions,
            exact,
            io_hook,
            kernel_map_extents,
            interval,
            metrics,
            metrics_remote,
            handoff,
            check_config,
            verbose,
        }) => {
            logging::init(verbose);
            let regions = match (exact, regions) {
                (true, Some(other)) if other != Regions::Exact => {
                    return fail(&format!("--exact and --regions {other} disagree"));
                }
                (true, _) => Regions::Exact,
                (false, Some(regions)) => regions,
                (false, None) if mapping(false) == Mapping::Exact => Regions::Exact,
                (false, None) => Regions::Tiled,
            };
            let follow = follow.unwrap_or(args::FollowMode::Inode);
            let paths = match path_specs(&paths, keep_groups, follow, made) {
                Ok(paths) => paths,
                Err(e) => return fail(&format!("{e:#}")),
            };
            let metrics = match metrics
                .map(|a| filemapd::daemon::metrics::check_address(a, metrics_remote))
                .transpose()
            {
                Ok(metrics) => metrics,
                Err(e) => return fail(&format!("{e:#}")),
            };
            let options = filemapd::daemon::watch::Options {
                config,
                paths,
                interval,
                ebpf: ebpf || ebpf_from_env(),
                regions,
                metrics,
                handoff,
                ebpf_log: false,
                io_hook,
                kernel_map_extents,
            };
            if check_config {
                ends_with_its_reader();
                return match filemapd::daemon::watch::check_config(&options) {
                    Ok(true) => ExitCode::SUCCESS,
                    Ok(false) => ExitCode::FAILURE,
                    Err(e) => fail(&format!("{e:#}")),
                };
            }
            watch(options)
        }
        Some(Command::Trace {
            paths,
            ebpf_log,
            verbose,
        }) => {
            // The programs' log is at debug level: --ebpf-log shows it without -vv.
            logging::init(if ebpf_log { verbose.max(2) } else { verbose });
            filemapd::daemon::trace::enable();
            let off_dm: Vec<_> = paths
                .iter()
                .filter(|p| !filemapd::daemon::trace_plain::on_device_mapper(p))
                .collect();
            if !off_dm.is_empty() {
                for path in off_dm {
                    log::warn!(
                        "{} is not on a device-mapper device: tracing its allocation events and FIEMAP reads only (regions and IO counters need device-mapper)",
                        path.display()
                    );
                }
                return trace_off_device_mapper(&paths);
            }
            watch(filemapd::daemon::watch::Options {
                config: None,
                paths: paths
                    .iter()
                    .map(|p| filemapd::daemon::watch::PathSpec::plain(p, true))
                    .collect(),
                interval: Duration::from_millis(500),
                ebpf: true,
                regions: Regions::Tiled,
                metrics: None,
                handoff: false,
                ebpf_log,
                io_hook: None,
                kernel_map_extents: None,
            })
        }
        Some(Command::Map { path, made }) => {
            logging::init(0);
            let result = made.settings().and_then(|settings| {
                oneshot::map(&path, made.alias.as_deref(), &made.program_id, settings)
            });
            match result {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => fail(&format!("{e:#}")),
            }
        }
        Some(Command::Unmap { path }) => {
            logging::init(0);
            match oneshot::unmap(&path) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&format!("{e:#}")),
            }
        }
        Some(Command::ManPages { dir }) => match man_pages(&dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&format!("{e:#}")),
        },
        Some(Command::Top {
            metrics,
            interval,
            sort,
            batch,
        }) => {
            logging::init(0);
            ends_with_its_reader();
            let options = filemapd::top::Options {
                address: metrics,
                interval,
                sort,
                batch,
            };
            match filemapd::top::run(&options) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&format!("{e:#}")),
            }
        }
        Some(Command::Report { paths }) => {
            logging::init(0);
            ends_with_its_reader();
            match filemapd::report::run(&paths) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::FAILURE,
                Err(e) => fail(&format!("{e:#}")),
            }
        }
        Some(Command::Show { path, group_id }) => {
            logging::init(0);
            ends_with_its_reader();
            match filemapd::show::run(&path, group_id) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&format!("{e:#}")),
            }
        }
        None => match args::parse(&cli.daemon_args) {
            Ok(args) => run_daemon(
                &args,
                cli.interval,
                cli.ebpf || ebpf_from_env(),
                mapping(cli.exact),
            ),
            Err(e) => fail(&e.to_string()),
        },
    }
}

/// A command that only reads and prints (`report`, `show`, `top`, `watch --check-config`)
/// ends quietly when its reader goes (`| head`), as other tools do: Rust starts with SIGPIPE
/// ignored, and a print to a closed pipe would panic. The daemons and `trace` keep it
/// ignored: a reader or a scraper that goes must not end them between two dm messages.
fn ends_with_its_reader() {
    // SAFETY: sets one signal's disposition to the default; no handler is involved.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
}

/// dmstats starts the daemon with lvm2's arguments only, so the eBPF trigger is chosen through
/// the environment dmstats passes on: FILEMAPD_EBPF=1.
fn ebpf_from_env() -> bool {
    std::env::var_os("FILEMAPD_EBPF").is_some_and(|v| v == "1")
}

/// Tiles unless `--exact` or FILEMAPD_EXACT=1 (for the daemons dmstats starts) asks for lvm2's
/// one region per extent.
fn mapping(exact: bool) -> Mapping {
    if exact || std::env::var_os("FILEMAPD_EXACT").is_some_and(|v| v == "1") {
        Mapping::Exact
    } else {
        Mapping::Tiled
    }
}

fn fail(message: &str) -> ExitCode {
    eprintln!("{message}");
    ExitCode::FAILURE
}

/// One page for filemapd and one per visible subcommand, in section 8 (system daemons).
fn man_pages(dir: &std::path::Path) -> anyhow::Result<()> {
    let mut cli = Cli::command().disable_help_subcommand(true);
    cli.build();
    let subcommands: Vec<clap::Command> = cli
        .get_subcommands()
        .filter(|s| !s.is_hide_set())
        .cloned()
        .collect();
    for page in std::iter::once(cli).chain(subcommands) {
        let written = clap_mangen::Man::new(page)
            .section("8")
            .generate_to(dir)
            .with_context(|| format!("writing a manual page into {}", dir.display()))?;
        println!("{}", written.display());
    }
    Ok(())
}

/// clap's error in one line: its first paragraph (some errors list what is missing on the
/// lines after the first), without the usage and help hint that follow.
fn clap_error_line(text: &str) -> String {
    let line = text
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect::<Vec<_>>()
        .join(" ");
    if line.is_empty() {
        "bad arguments".to_string()
    } else {
        line
    }
}

fn watch(options: filemapd::daemon::watch::Options) -> ExitCode {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        // The thread a scrape reads dm-stats on waits for the next scrape instead of waking
        // after tokio's default 10 s to end (Prometheus scrapes every 15 s or more).
        .thread_keep_alive(Duration::from_secs(24 * 3600))
        .build();
    let result = runtime
        .context("starting the runtime")
        .and_then(|rt| rt.block_on(filemapd::daemon::watch::run(options)));
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => fail(&format!("{e:#}")),
    }
}

/// `filemapd trace` where a file is not on device-mapper: events and extents only.
fn trace_off_device_mapper(paths: &[PathBuf]) -> ExitCode {
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")
        .and_then(|rt| rt.block_on(filemapd::daemon::trace_plain::run(paths)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&format!("{e:#}")),
    }
}

fn run_daemon(args: &DaemonArgs, interval: Duration, ebpf: bool, mapping: Mapping) -> ExitCode {
    logging::init(args.verbose);
    log::info!(
        "Starting dmfilemapd with fd={}, group_id={} mode={}, path=\"{}\"",
        args.fd,
        args.group_id,
        args.mode,
        args.path.display()
    );
    let mut monitor = match Monitor::new(args, interval) {
        Ok(monitor) => monitor,
        Err(e) => return fail(&format!("{e:#}")),
    };
    // (Also what a test waits for before it changes the group.)
    log::info!("Monitoring {}", monitor.describe());
    if mapping == Mapping::Exact {
        monitor.use_exact_mapping();
    }
    // With a `filemapd watch --handoff` service running, it keeps the group instead.
    let socket = filemapd::daemon::handoff::socket_for_daemons();
    match filemapd::daemon::handoff::offer(&socket, args.fd, args.group_id, args.mode, &args.path) {
        Ok(true) => {
            log::info!("Handed the file to the filemapd service");
            return ExitCode::SUCCESS;
        }
        Ok(false) => {}
        Err(e) => log::warn!("{e:#}: running alone"),
    }
    if !args.foreground {
        if let Err(e) = daemonize(&monitor.open_fds(), args.verbose) {
            return fail(&format!("{e:#}"));
        }
        if let Err(why) = logging::detach(invoked_as()) {
            // Only seen where stderr still goes somewhere (verbose > 0).
            log::debug!("no syslog ({why}): logging to stderr");
        }
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let result = runtime.context("starting the runtime").and_then(|rt| {
        rt.block_on(async {
            if ebpf {
                // Room for two inodes: in path mode the new file is watched before the old one
                // is let go.
                let regions = monitor.regions_at_start();
                let tables = one_file_tables(regions);
                log::debug!(
                    "kernel sector map: {} for a group of {regions} region(s)",
                    tables_size(tables)
                );
                match Tracer::load(2, tables) {
                    Ok(tracer) => {
                        let names: Vec<&str> = tracer.attached().iter().map(|t| t.name).collect();
                        log::info!("eBPF trigger on {}", names.join(", "));
                        let notifier = Notifier::spawn_or_warn();
                        monitor
                            .use_ebpf(&Hub::spawn(tracer), notifier.as_ref())
                            .await?;
                        if monitor.event_driven() {
                            log::info!("Waking on events only (no check interval)");
                        }
                    }
                    Err(e) => {
                        log::warn!("eBPF trigger unavailable ({e:#}): polling every {interval:?}")
                    }
                }
            }
            monitor.run_until_terminated().await
        })
    });
    log::info!("{}", monitor.tally());
    if let Some(totals) = monitor.kernel_counters() {
        log::info!(
            "Its IO, counted in the kernel: {}",
            counting::describe(&totals)
        );
    }
    if let Some(counting) = monitor.counting() {
        counting.say_io_probe_skips();
    }
    match result {
        Ok(exit) => {
            log::info!("{}", exit.message());
            ExitCode::SUCCESS
        }
        Err(e) => {
            log::error!("{e:#}");
            log::error!("Exiting");
            ExitCode::FAILURE
        }
    }
}
