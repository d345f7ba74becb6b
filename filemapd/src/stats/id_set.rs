//! A set of region ids kept as runs (`0-3,5,9-10`), the shape libdm writes them in. A group of
//! 100,000 regions created in a row is one run: adding or removing a member costs O(log runs)
//! and writing the descriptor O(runs), not O(members).
use std::{collections::BTreeMap, fmt};

use anyhow::{Context as _, bail};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdSet {
    /// first id of a run → last id of it (inclusive); runs neither overlap nor touch.
    runs: BTreeMap<u64, u64>,
    len: usize,
}

impl IdSet {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The lowest id (a group's leader).
    pub fn first(&self) -> Option<u64> {
        self.runs.keys().next().copied()
    }

    /// The run holding `id`, if any.
    fn run_of(&self, id: u64) -> Option<(u64, u64)> {
        let (&first, &last) = self.runs.range(..=id).next_back()?;
        (id <= last).then_some((first, last))
    }

    pub fn contains(&self, id: u64) -> bool {
        self.run_of(id).is_some()
    }

    /// Adds `id`; returns whether it was new.
    pub fn insert(&mut self, id: u64) -> bool {
        if self.contains(id) {
            return false;
        }
        let before = id
            .checked_sub(1)
            .and_then(|p| self.run_of(p))
            .map(|(first, _)| first);
        let after = id.checked_add(1).and_then(|n| self.runs.remove_entry(&n));
        let last = after.map_or(id, |(_, last)| last);
        match before {
            Some(first) => {
                self.runs.insert(first, last);
            }
            None => {
                self.runs.insert(id, last);
            }
        }
        self.len += 1;
        true
    }

    /// Adds every id of `first..=last` in O(log runs + runs merged): a descriptor naming a
    /// long run (any process may write one) costs no more than a short one.
    pub fn insert_run(&mut self, first: u64, last: u64) {
        let (mut lo, mut hi) = (first, last);
        // Runs neither overlap nor touch, so their ends rise with their starts: walking down
        // from the last run starting by hi + 1, those touching lo..=hi come first.
        let touching: Vec<(u64, u64)> = self
            .runs
            .range(..=hi.saturating_add(1))
            .rev()
            .take_while(|&(_, &end)| end.saturating_add(1) >= lo)
            .map(|(&start, &end)| (start, end))
            .collect();
        for (start, end) in touching {
            self.runs.remove(&start);
            self.len -= (end - start + 1) as usize;
            lo = lo.min(start);
            hi = hi.max(end);
        }
        self.runs.insert(lo, hi);
        self.len += (hi - lo + 1) as usize;
    }

    /// Removes `id`; returns whether it was there.
    pub fn remove(&mut self, id: u64) -> bool {
        let Some((first, last)) = self.run_of(id) else {
            return false;
        };
        self.runs.remove(&first);
        if first < id {
            self.runs.insert(first, id - 1);
        }
        if id < last {
            self.runs.insert(id + 1, last);
        }
        self.len -= 1;
        true
    }

    /// Every id, ascending.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.runs.iter().flat_map(|(&first, &last)| first..=last)
    }

    pub fn to_vec(&self) -> Vec<u64> {
        self.iter().collect()
    }

    /// Parses range notation (`0-3,5,9-10`); ids may come in any order and repeat.
    pub fn parse(list: &str) -> anyhow::Result<Self> {
        let mut set = Self::new();
        for item in list.split(',') {
            let (first, last) = item.split_once('-').unwrap_or((item, item));
            let first: u64 = first
                .parse()
                .with_context(|| format!("bad region id {first:?}"))?;
            let last: u64 = last
                .parse()
                .with_context(|| format!("bad region id {last:?}"))?;
            if first > last {
                bail!("descending range {item:?}");
            }
            if last - first > 1 << 24 {
                bail!("range {item:?} is larger than any device's region count");
            }
            set.insert_run(first, last);
        }
        Ok(set)
    }
}

impl Extend<u64> for IdSet {
    fn extend<I: IntoIterator<Item = u64>>(&mut self, ids: I) {
        for id in ids {
            self.insert(id);
        }
    }
}

impl FromIterator<u64> for IdSet {
    fn from_iter<I: IntoIterator<Item = u64>>(ids: I) -> Self {
        let mut set = Self::new();
        set.extend(ids);
        set
    }
}

/// Range notation as libdm writes it: runs of two or more as `a-b`.
impl fmt::Display for IdSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (&first, &last)) in self.runs.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if first == last {
                write!(f, "{first}")?;
            } else {
                write!(f, "{first}-{last}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn runs_join_and_split() {
        let mut set: IdSet = [3, 1, 2, 9].into_iter().collect();
        assert_eq!(set.to_string(), "1-3,9");
        assert!(set.insert(8));
        assert!(!set.insert(8));
        assert_eq!(set.to_string(), "1-3,8-9");
        assert!(set.remove(2));
        assert!(!set.remove(2));
        assert_eq!(set.to_string(), "1,3,8-9");
        assert_eq!(set.first(), Some(1));
        assert_eq!(set.len(), 4);
    }

    #[test]
    fn a_list_of_long_runs_parses_at_once() {
        // Found by the group_descriptor fuzz target: runs were added id by id, so this took
        // minutes (a billion inserts); now it is 64 run merges.
        let list = vec!["0-16777216"; 64].join(",");
        let set = IdSet::parse(&list).unwrap();
        assert_eq!(set.len(), 16_777_217);
        assert_eq!(set.to_string(), "0-16777216");
    }

    #[test]
    fn bad_lists_are_refused() {
        for bad in ["", "a", "3-1", "1,,2", "0-99999999999"] {
            assert!(IdSet::parse(bad).is_err(), "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn behaves_like_a_sorted_set(
            ops in proptest::collection::vec((0u8..3, 0u64..40, 0u64..6), 0..200),
        ) {
            let mut set = IdSet::new();
            let mut model = std::collections::BTreeSet::new();
            for (op, id, span) in ops {
                match op {
                    0 => prop_assert_eq!(set.insert(id), model.insert(id)),
                    1 => prop_assert_eq!(set.remove(id), model.remove(&id)),
                    _ => {
                        set.insert_run(id, id + span);
                        model.extend(id..=id + span);
                    }
                }
            }
            prop_assert_eq!(set.to_vec(), model.iter().copied().collect::<Vec<_>>());
            prop_assert_eq!(set.len(), model.len());
            if !set.is_empty() {
                prop_assert_eq!(IdSet::parse(&set.to_string()).unwrap(), set);
            }
        }
    }
}
