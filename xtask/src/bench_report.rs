//! BENCHMARKS.md as named parts. Each part's sections sit between two markers, the first of
//! which records how that part ran (commit, date, rounds, minutes, guest kernel), so that a
//! part run replaces its own block alone and the header can say, of every part, when and at
//! which commit it ran, and whether the report as a whole is one commit's.
use std::fmt::Write as _;

/// How one part ran, as its opening marker records it.
#[derive(Clone, Debug, PartialEq)]
pub struct PartRun {
    pub name: String,
    pub commit: String,
    pub date: String,
    pub rounds: String,
    pub minutes: String,
    pub kernel: String,
}

/// A part's block: how it ran and its markdown.
#[derive(Clone, Debug, PartialEq)]
pub struct Block {
    pub run: PartRun,
    pub body: String,
}

const OPEN: &str = "<!-- part ";
const CLOSE: &str = "<!-- end of part ";

impl PartRun {
    fn marker(&self) -> String {
        format!(
            "{OPEN}{}: commit={}; date={}; rounds={}; minutes={}; kernel={} -->",
            self.name, self.commit, self.date, self.rounds, self.minutes, self.kernel
        )
    }

    fn from_marker(line: &str) -> Option<Self> {
        let inner = line.strip_prefix(OPEN)?.strip_suffix(" -->")?;
        let (name, fields) = inner.split_once(": ")?;
        let field = |key: &str| {
            fields
                .split("; ")
                .find_map(|f| f.strip_prefix(key)?.strip_prefix('='))
                .map(str::to_string)
        };
        Some(PartRun {
            name: name.to_string(),
            commit: field("commit")?,
            date: field("date")?,
            rounds: field("rounds")?,
            minutes: field("minutes")?,
            kernel: field("kernel")?,
        })
    }
}

/// The part blocks of a report, in the order they appear (none in a report without markers).
pub fn blocks(report: &str) -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut open: Option<Block> = None;
    for line in report.lines() {
        if let Some(run) = PartRun::from_marker(line) {
            open = Some(Block {
                run,
                body: String::new(),
            });
        } else if line.starts_with(CLOSE) {
            blocks.extend(open.take());
        } else if let Some(block) = open.as_mut() {
            block.body.push_str(line);
            block.body.push('\n');
        }
    }
    blocks
}

/// The report: `intro`, a table of every part in `order` (those never run say so), whether
/// they all ran at one commit, then each block in `order`.
pub fn render(intro: &str, order: &[(&str, &[&str])], blocks: &[Block]) -> String {
    let find = |name: &str| blocks.iter().find(|b| b.run.name == name);
    let mut md = String::new();
    let _ = writeln!(md, "# Benchmarks\n\n{}\n", intro.trim_end());
    md.push_str("| part | sections | commit | date | rounds | minutes | guest kernel |\n");
    md.push_str("| --- | --- | --- | --- | --- | --- | --- |\n");
    for (name, sections) in order {
        let sections = sections.join(", ");
        match find(name) {
            Some(Block { run, .. }) => {
                let _ = writeln!(
                    md,
                    "| {name} | {sections} | {} | {} | {} | {} | {} |",
                    run.commit, run.date, run.rounds, run.minutes, run.kernel
                );
            }
            None => {
                let _ = writeln!(md, "| {name} | {sections} | not run yet | | | | |");
            }
        }
    }
    md.push('\n');
    md.push_str(&verdict(order, blocks));
    md.push_str("\n\n");
    for (name, _) in order {
        if let Some(block) = find(name) {
            let _ = writeln!(md, "{}", block.run.marker());
            md.push_str(block.body.trim_end());
            let _ = writeln!(md, "\n{CLOSE}{name} -->\n");
        }
    }
    md.truncate(md.trim_end().len());
    md.push('\n');
    md
}

/// Whether the report is one commit's: every part run, all at one commit with nothing
/// uncommitted beside it.
fn verdict(order: &[(&str, &[&str])], blocks: &[Block]) -> String {
    let commits: Vec<Option<&str>> = order
        .iter()
        .map(|(name, _)| {
            blocks
                .iter()
                .find(|b| b.run.name == *name)
                .map(|b| b.run.commit.as_str())
        })
        .collect();
    let first = commits.first().copied().flatten();
    let one_commit =
        first.is_some_and(|c| !c.contains(' ') && commits.iter().all(|&other| other == Some(c)));
    match first {
        Some(commit) if one_commit => {
            format!("Every part ran at commit {commit}: the report is that commit's.")
        }
        _ => "**Not one commit's report**: the parts ran at different commits, with uncommitted \
              changes, or not at all. `cargo xtask bench` runs them all; `cargo xtask bench \
              --part NAME` one of them."
            .to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORDER: &[(&str, &[&str])] = &[("a", &["x"]), ("b", &["y", "z"])];

    fn run(name: &str, commit: &str) -> PartRun {
        PartRun {
            name: name.into(),
            commit: commit.into(),
            date: "2026-12-04".into(),
            rounds: "5".into(),
            minutes: "12".into(),
            kernel: "6.1.0-57-amd64".into(),
        }
    }

    #[test]
    fn a_rendered_report_reads_back_as_its_blocks() {
        let blocks = vec![
            Block {
                run: run("a", "abc1234"),
                body: "## X\n\n| t |\n".into(),
            },
            Block {
                run: run("b", "abc1234 with uncommitted changes"),
                body: "## Y\n".into(),
            },
        ];
        let report = render("Intro.", ORDER, &blocks);
        assert_eq!(super::blocks(&report), blocks);
        assert!(report.contains("**Not one commit's report**"));
    }

    #[test]
    fn one_commit_only_when_every_part_ran_there() {
        let block = |name, commit| Block {
            run: run(name, commit),
            body: "body\n".into(),
        };
        let both = [block("a", "abc1234"), block("b", "abc1234")];
        assert!(render("", ORDER, &both).contains("Every part ran at commit abc1234"));
        let one = [block("a", "abc1234")];
        let report = render("", ORDER, &one);
        assert!(report.contains("| b | y, z | not run yet |"));
        assert!(report.contains("**Not one commit's report**"));
        let two = [block("a", "abc1234"), block("b", "def5678")];
        assert!(render("", ORDER, &two).contains("**Not one commit's report**"));
    }

    #[test]
    fn the_committed_report_holds_every_part_and_renders_back_the_same() {
        let path = crate::cmd::workspace_root().join("BENCHMARKS.md");
        let report = std::fs::read_to_string(path).unwrap();
        let found = blocks(&report);
        let names: Vec<&str> = found.iter().map(|b| b.run.name.as_str()).collect();
        let parts: Vec<&str> = crate::bench::PARTS.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, parts);
        let intro_end = report.find("\n| part |").unwrap();
        let intro = report["# Benchmarks\n\n".len()..intro_end].to_string();
        assert_eq!(render(&intro, crate::bench::PARTS, &found), report);
    }

    #[test]
    fn a_report_without_markers_has_no_blocks() {
        assert!(blocks("# Benchmarks\n\n## Latency\n").is_empty());
    }
}
