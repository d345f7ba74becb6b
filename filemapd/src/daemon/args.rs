//! The dmfilemapd command line, as dmstats launches it:
//! `dmfilemapd <fd> <group_id> <abs_path> <mode> [<foreground>[<verbose>]]`.
//! Checks and messages follow lvm2's daemon so that scripts see the same errors; every error
//! is one line (plus the usage line for a wrong argument count).
use std::{fmt, path::PathBuf};

pub const USAGE: &str = "dmfilemapd <fd> <group_id> <abs_path> <mode> [<foreground>[<log_level>]]";

/// How the daemon follows the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum FollowMode {
    /// Follow the open inode; exit when it is unlinked and nobody holds it.
    Inode,
    /// Follow the path; re-map when the file at the path is replaced.
    Path,
}

impl fmt::Display for FollowMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FollowMode::Inode => "inode",
            FollowMode::Path => "path",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DaemonArgs {
    pub fd: i32,
    pub group_id: u64,
    pub path: PathBuf,
    pub mode: FollowMode,
    pub foreground: bool,
    /// 0..=3: 0 logs warnings and errors only; 1..3 add info, debug, trace.
    pub verbose: u8,
}

/// A rejected command line: the message to print (one line), with the usage line or not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArgsError {
    pub message: String,
    pub show_usage: bool,
}

impl fmt::Display for ArgsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if self.show_usage {
            write!(f, "\nusage: {USAGE}")?;
        }
        Ok(())
    }
}

fn error(message: String) -> ArgsError {
    ArgsError {
        message,
        show_usage: false,
    }
}

/// Parses the positional arguments (without argv[0]).
///
/// One knowing difference from lvm2: lvm2's check demands five arguments although its usage
/// line marks `<foreground>` optional; we accept four, as the usage line says.
pub fn parse(args: &[String]) -> Result<DaemonArgs, ArgsError> {
    if !(4..=6).contains(&args.len()) {
        return Err(ArgsError {
            message: "Wrong number of arguments.".into(),
            show_usage: true,
        });
    }
    let fd = parse_int::<i32>(&args[0])
        .filter(|fd| *fd >= 0)
        .ok_or_else(|| error(format!("Could not parse file descriptor: {}", args[0])))?;
    let group_id = parse_int::<u64>(&args[1])
        .ok_or_else(|| error(format!("Could not parse group identifier: {}", args[1])))?;
    let path = &args[2];
    if path.is_empty() {
        return Err(error("Path argument is required.".into()));
    }
    if !path.starts_with('/') {
        return Err(error("Path argument must specify an absolute path.".into()));
    }
    let mode = match args[3].as_str() {
        "" => return Err(error("Mode argument is required.".into())),
        "inode" => FollowMode::Inode,
        "path" => FollowMode::Path,
        other => return Err(error(format!("Could not parse dmfilemapd mode: {other}"))),
    };
    let foreground = match args.get(4) {
        None => false,
        Some(arg) => {
            parse_int::<i64>(arg)
                .ok_or_else(|| error(format!("Could not parse debug argument: {arg}.")))?
                != 0
        }
    };
    let verbose = match args.get(5) {
        None => 0,
        Some(arg) => {
            let level = parse_int::<i64>(arg)
                .ok_or_else(|| error(format!("Could not parse verbose argument: {arg}")))?;
            u8::try_from(level)
                .ok()
                .filter(|v| *v <= 3)
                .ok_or_else(|| error(format!("Verbose argument out of range: {level}.")))?
        }
    };
    Ok(DaemonArgs {
        fd,
        group_id,
        path: PathBuf::from(path),
        mode,
        foreground,
        verbose,
    })
}

/// A whole decimal integer; unlike C's strtol, an empty string or trailing junk is an error.
fn parse_int<T: std::str::FromStr>(text: &str) -> Option<T> {
    if text.is_empty()
        || !text
            .trim_start_matches(['-', '+'])
            .bytes()
            .all(|b| b.is_ascii_digit())
    {
        return None;
    }
    text.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn accepts_what_dmstats_passes() {
        let a = parse(&args(&["6", "1", "/mnt/f", "path", "0", "1"])).unwrap();
        assert_eq!(
            a,
            DaemonArgs {
                fd: 6,
                group_id: 1,
                path: "/mnt/f".into(),
                mode: FollowMode::Path,
                foreground: false,
                verbose: 1
            }
        );
        let a = parse(&args(&["3", "0", "/f", "inode"])).unwrap();
        assert_eq!(
            (a.mode, a.foreground, a.verbose),
            (FollowMode::Inode, false, 0)
        );
        assert!(
            parse(&args(&["3", "0", "/f", "inode", "1"]))
                .unwrap()
                .foreground
        );
    }

    #[test]
    fn every_bad_invocation_has_its_one_line_message() {
        let cases: &[(&[&str], &str)] = &[
            (&[], "Wrong number of arguments."),
            (&["3"], "Wrong number of arguments."),
            (&["3", "0", "/f"], "Wrong number of arguments."),
            (
                &["3", "0", "/f", "inode", "0", "1", "extra"],
                "Wrong number of arguments.",
            ),
            (
                &["x", "0", "/f", "inode"],
                "Could not parse file descriptor: x",
            ),
            (
                &["3x", "0", "/f", "inode"],
                "Could not parse file descriptor: 3x",
            ),
            (
                &["", "0", "/f", "inode"],
                "Could not parse file descriptor: ",
            ),
            (
                &["-1", "0", "/f", "inode"],
                "Could not parse file descriptor: -1",
            ),
            (
                &["99999999999", "0", "/f", "inode"],
                "Could not parse file descriptor: 99999999999",
            ),
            (
                &["3", "g", "/f", "inode"],
                "Could not parse group identifier: g",
            ),
            (
                &["3", "-1", "/f", "inode"],
                "Could not parse group identifier: -1",
            ),
            (
                &["3", "1.5", "/f", "inode"],
                "Could not parse group identifier: 1.5",
            ),
            (
                &["3", "", "/f", "inode"],
                "Could not parse group identifier: ",
            ),
            (&["3", "0", "", "inode"], "Path argument is required."),
            (
                &["3", "0", "f", "inode"],
                "Path argument must specify an absolute path.",
            ),
            (
                &["3", "0", "./f", "inode"],
                "Path argument must specify an absolute path.",
            ),
            (&["3", "0", "/f", ""], "Mode argument is required."),
            (
                &["3", "0", "/f", "Inode"],
                "Could not parse dmfilemapd mode: Inode",
            ),
            (
                &["3", "0", "/f", "follow"],
                "Could not parse dmfilemapd mode: follow",
            ),
            (
                &["3", "0", "/f", "inode", "yes"],
                "Could not parse debug argument: yes.",
            ),
            (
                &["3", "0", "/f", "inode", "1", "v"],
                "Could not parse verbose argument: v",
            ),
            (
                &["3", "0", "/f", "inode", "1", "4"],
                "Verbose argument out of range: 4.",
            ),
            (
                &["3", "0", "/f", "inode", "1", "-1"],
                "Verbose argument out of range: -1.",
            ),
        ];
        for (argv, message) in cases {
            let err = parse(&args(argv)).expect_err(&format!("{argv:?} should be refused"));
            assert_eq!(err.message, *message, "for {argv:?}");
            assert!(!err.message.contains('\n'));
        }
    }

    #[test]
    fn wrong_count_prints_usage_too() {
        let text = parse(&args(&["1"])).unwrap_err().to_string();
        assert_eq!(text, format!("Wrong number of arguments.\nusage: {USAGE}"));
    }
}
