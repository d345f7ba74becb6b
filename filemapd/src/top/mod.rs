//! `filemapd top`: a live view of the watched files, like iotop for images. It reads a
//! `filemapd watch --metrics` endpoint every interval and shows, per file, MB/s and IOPS
//! read and written over the interval, latency p50/p99 from the file's histogram, IOs in
//! flight, regions, how its regions follow it, who counts its IO and how it is woken. In a
//! terminal it is a full-screen view (ratatui): `s` sorts by the next column, `r` reverses,
//! `q` quits. With `--batch N` it prints N plain tables and exits, for scripts.
pub(crate) mod exposition;
mod rates;

use std::time::{Duration, Instant};

use anyhow::Context as _;
use ratatui::{
    crossterm::event::{self, Event, KeyCode, KeyEventKind},
    layout::{Constraint, Layout},
    style::{Modifier, Style},
    text::Line,
    widgets::{Cell, Row as TableRow, Table},
};

use rates::Row;
pub use rates::SortBy;

/// How `top` runs.
pub struct Options {
    /// The endpoint's host:port.
    pub address: String,
    pub interval: Duration,
    pub sort: SortBy,
    /// Plain tables, this many, instead of the full-screen view.
    pub batch: Option<u32>,
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    let mut readings = Readings::start(&options.address)?;
    match options.batch {
        Some(tables) => {
            for _ in 0..tables {
                std::thread::sleep(options.interval);
                let mut rows = readings.next()?;
                rates::sort(&mut rows, options.sort, false);
                print!("{}", plain_table(&rows, options));
            }
            Ok(())
        }
        None => {
            let mut terminal = ratatui::try_init().context("opening the terminal")?;
            let result = (|| -> anyhow::Result<()> {
                let (mut sort, mut reversed) = (options.sort, false);
                let mut rows = Vec::new();
                loop {
                    let mut shown = rows.clone();
                    rates::sort(&mut shown, sort, reversed);
                    terminal.draw(|frame| draw(frame, &shown, options, sort, reversed))?;
                    let wait = options.interval.saturating_sub(readings.age());
                    if event::poll(wait)? {
                        if let Event::Key(key) = event::read()?
                            && key.kind == KeyEventKind::Press
                        {
                            match key.code {
                                KeyCode::Char('q') | KeyCode::Esc => return Ok(()),
                                KeyCode::Char('s') => sort = sort.next(),
                                KeyCode::Char('r') => reversed = !reversed,
                                _ => {}
                            }
                        }
                        continue;
                    }
                    rows = readings.next()?;
                }
            })();
            ratatui::restore();
            result
        }
    }
}

/// The endpoint's last reading, which the next is rated against.
struct Readings<'a> {
    address: &'a str,
    last: exposition::Scrape,
    at: Instant,
}

impl<'a> Readings<'a> {
    fn start(address: &'a str) -> anyhow::Result<Self> {
        Ok(Self {
            address,
            last: Self::read(address)?,
            at: Instant::now(),
        })
    }

    /// Reads again: each file's rates since the last reading (unsorted).
    fn next(&mut self) -> anyhow::Result<Vec<Row>> {
        let now = Self::read(self.address)?;
        let rows = rates::rows(&self.last, &now, self.age().as_secs_f64());
        self.last = now;
        self.at = Instant::now();
        Ok(rows)
    }

    /// How long ago the last reading was.
    fn age(&self) -> Duration {
        self.at.elapsed()
    }

    fn read(address: &str) -> anyhow::Result<exposition::Scrape> {
        Ok(exposition::parse(&exposition::fetch(address)?))
    }
}

const HEADER: [&str; 12] = [
    "FILE",
    "READ MB/s",
    "WRITE MB/s",
    "READ IOPS",
    "WRITE IOPS",
    "p50 ms",
    "p99 ms",
    "IN FLIGHT",
    "REGIONS",
    "MODE",
    "COUNTED BY",
    "WOKEN BY",
];

/// A row's cells, as both views print them.
fn cells(row: &Row) -> [String; 12] {
    let ms = |s: Option<f64>| s.map_or("-".to_string(), |s| format!("{:.2}", s * 1e3));
    [
        if row.alias.is_empty() {
            row.path.clone()
        } else {
            row.alias.clone()
        },
        format!("{:.2}", row.read_mbps),
        format!("{:.2}", row.write_mbps),
        format!("{:.0}", row.read_iops),
        format!("{:.0}", row.write_iops),
        ms(row.p50),
        ms(row.p99),
        format!("{:.0}", row.in_flight),
        row.regions.map_or("-".to_string(), |r| format!("{r:.0}")),
        row.mode.clone(),
        row.counted_by.clone(),
        row.wakeup.clone(),
    ]
}

fn plain_table(rows: &[Row], options: &Options) -> String {
    let mut table: Vec<[String; 12]> = vec![HEADER.map(String::from)];
    table.extend(rows.iter().map(cells));
    let widths: Vec<usize> = (0..HEADER.len())
        .map(|c| {
            table
                .iter()
                .map(|r| r[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = format!(
        "filemapd top: {} file(s) at {}, every {:.1} s, by {}\n",
        rows.len(),
        options.address,
        options.interval.as_secs_f64(),
        options.sort.name()
    );
    for row in table {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(c, (cell, w))| match c {
                0 => format!("{cell:<w$}"),
                _ => format!("{cell:>w$}"),
            })
            .collect();
        out += line.join("  ").trim_end();
        out.push('\n');
    }
    out.push('\n');
    out
}

fn draw(frame: &mut ratatui::Frame, rows: &[Row], options: &Options, sort: SortBy, reversed: bool) {
    let [title, body] =
        Layout::vertical([Constraint::Length(1), Constraint::Min(0)]).areas(frame.area());
    frame.render_widget(
        Line::from(format!(
            "filemapd top — {} file(s) at {}, every {:.1} s; sorted by {}{} (s: next column, r: reverse, q: quit)",
            rows.len(),
            options.address,
            options.interval.as_secs_f64(),
            sort.name(),
            if reversed { ", reversed" } else { "" }
        )),
        title,
    );
    let widths = [
        Constraint::Fill(3),
        Constraint::Length(10),
        Constraint::Length(10),
        Constraint::Length(9),
        Constraint::Length(10),
        Constraint::Length(8),
        Constraint::Length(8),
        Constraint::Length(9),
        Constraint::Length(7),
        Constraint::Length(5),
        Constraint::Length(10),
        Constraint::Fill(1),
    ];
    let header = TableRow::new(HEADER.map(Cell::from))
        .style(Style::default().add_modifier(Modifier::REVERSED));
    let table = Table::new(
        rows.iter().map(|r| TableRow::new(cells(r).map(Cell::from))),
        widths,
    )
    .header(header);
    frame.render_widget(table, body);
}
