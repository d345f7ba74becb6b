//! The group descriptor libdm keeps in a group leader's aux_data:
//! `DMS_GROUP=<alias>:<members>#<user aux_data>`, e.g. `DMS_GROUP=img:0-3,5#-`.
//!
//! Two spellings of the alias exist: Debian's dmstats 1.02.185 writes it bare (`img:`), newer
//! lvm2 quotes it (`"img":`). We read both and write back the spelling we read, byte for byte.
use std::fmt;

use anyhow::{Context as _, bail, ensure};

const TAG: &str = "DMS_GROUP=";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupDescriptor {
    /// The alias as the user gave it (without quotes); may be empty.
    pub alias: String,
    /// Whether the alias was written inside double quotes.
    pub quoted: bool,
    /// Member region ids, ascending, without duplicates. The first is the leader.
    pub members: Vec<u64>,
    /// What followed `#`: the user's own aux_data (`-` when none). `None` when there was no `#`.
    pub user_aux: Option<String>,
}

impl GroupDescriptor {
    /// Parses a region's aux_data; `Ok(None)` when it carries no group tag.
    pub fn parse(aux_data: &str) -> anyhow::Result<Option<Self>> {
        let Some(rest) = aux_data.strip_prefix(TAG) else {
            return Ok(None);
        };
        let (alias, quoted, rest) = match rest.strip_prefix('"') {
            Some(quoted) => {
                let close = quoted
                    .find("\":")
                    .with_context(|| format!("unterminated quoted alias in {aux_data:?}"))?;
                (&quoted[..close], true, &quoted[close + 2..])
            }
            None => {
                let colon = rest
                    .find(':')
                    .with_context(|| format!("no ':' after the alias in {aux_data:?}"))?;
                (&rest[..colon], false, &rest[colon + 1..])
            }
        };
        let (members, user_aux) = match rest.split_once('#') {
            Some((members, user)) => (members, Some(user.to_string())),
            None => (rest, None),
        };
        let members = parse_members(members)
            .with_context(|| format!("bad member list in group descriptor {aux_data:?}"))?;
        Ok(Some(Self {
            alias: alias.to_string(),
            quoted,
            members,
            user_aux,
        }))
    }

    /// The leader: the lowest member id.
    pub fn leader(&self) -> Option<u64> {
        self.members.first().copied()
    }

    /// A descriptor for a new set of members, keeping alias, spelling and user aux_data.
    pub fn with_members(&self, mut members: Vec<u64>) -> Self {
        members.sort_unstable();
        members.dedup();
        Self {
            members,
            ..self.clone()
        }
    }

    /// Checks that the descriptor can travel inside one dm message argument.
    pub fn validate_alias(alias: &str) -> anyhow::Result<()> {
        ensure!(
            !alias.chars().any(char::is_whitespace),
            "group alias {alias:?} contains white space, which cannot pass through a \
             device-mapper message"
        );
        ensure!(
            !alias.contains(['"', ':', '#']),
            "group alias {alias:?} contains '\"', ':' or '#'"
        );
        Ok(())
    }
}

impl fmt::Display for GroupDescriptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(TAG)?;
        if self.quoted {
            write!(f, "\"{}\":", self.alias)?;
        } else {
            write!(f, "{}:", self.alias)?;
        }
        f.write_str(&format_members(&self.members))?;
        if let Some(user) = &self.user_aux {
            write!(f, "#{user}")?;
        }
        Ok(())
    }
}

/// Parses range notation (`0-3,5,9-10`) into ascending, distinct ids.
pub fn parse_members(list: &str) -> anyhow::Result<Vec<u64>> {
    let mut ids = Vec::new();
    for item in list.split(',') {
        let (first, last) = match item.split_once('-') {
            Some((a, b)) => (a, b),
            None => (item, item),
        };
        let first: u64 = first
            .parse()
            .with_context(|| format!("bad region id {first:?}"))?;
        let last: u64 = last
            .parse()
            .with_context(|| format!("bad region id {last:?}"))?;
        if first > last {
            bail!("descending range {item:?}");
        }
        ids.extend(first..=last);
    }
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

/// Formats ascending ids in range notation as libdm does: runs of two or more as `a-b`.
pub fn format_members(ids: &[u64]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < ids.len() {
        let mut j = i;
        while j + 1 < ids.len() && ids[j + 1] == ids[j] + 1 {
            j += 1;
        }
        if !out.is_empty() {
            out.push(',');
        }
        if i == j {
            out.push_str(&ids[i].to_string());
        } else {
            out.push_str(&format!("{}-{}", ids[i], ids[j]));
        }
        i = j + 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn reads_debians_bare_alias() {
        let g = GroupDescriptor::parse("DMS_GROUP=img:0#-")
            .unwrap()
            .unwrap();
        assert_eq!(g.alias, "img");
        assert!(!g.quoted);
        assert_eq!(g.members, vec![0]);
        assert_eq!(g.user_aux.as_deref(), Some("-"));
        assert_eq!(g.to_string(), "DMS_GROUP=img:0#-");
    }

    #[test]
    fn reads_newer_lvm2s_quoted_alias() {
        let g = GroupDescriptor::parse("DMS_GROUP=\"img\":0-1#-")
            .unwrap()
            .unwrap();
        assert_eq!(g.alias, "img");
        assert!(g.quoted);
        assert_eq!(g.members, vec![0, 1]);
        assert_eq!(g.to_string(), "DMS_GROUP=\"img\":0-1#-");
    }

    #[test]
    fn keeps_user_aux_data_and_empty_alias() {
        let g = GroupDescriptor::parse("DMS_GROUP=:3-5,9#mydata")
            .unwrap()
            .unwrap();
        assert_eq!(g.alias, "");
        assert_eq!(g.members, vec![3, 4, 5, 9]);
        assert_eq!(g.leader(), Some(3));
        assert_eq!(g.user_aux.as_deref(), Some("mydata"));
        assert_eq!(g.to_string(), "DMS_GROUP=:3-5,9#mydata");
    }

    #[test]
    fn regrouping_keeps_alias_spelling_and_user_data() {
        let g = GroupDescriptor::parse("DMS_GROUP=f1:0-1#-")
            .unwrap()
            .unwrap();
        assert_eq!(
            g.with_members(vec![7, 2, 3, 2]).to_string(),
            "DMS_GROUP=f1:2-3,7#-"
        );
    }

    #[test]
    fn aux_data_without_tag_is_no_group() {
        assert_eq!(GroupDescriptor::parse("-").unwrap(), None);
        assert_eq!(GroupDescriptor::parse("something").unwrap(), None);
    }

    #[test]
    fn malformed_descriptors_are_errors() {
        for bad in [
            "DMS_GROUP=img",
            "DMS_GROUP=\"img:0#-",
            "DMS_GROUP=img:#-",
            "DMS_GROUP=img:3-1#-",
            "DMS_GROUP=img:x#-",
            "DMS_GROUP=img:1,,2#-",
        ] {
            assert!(
                GroupDescriptor::parse(bad).is_err(),
                "{bad} should not parse"
            );
        }
    }

    #[test]
    fn aliases_with_white_space_are_refused() {
        assert!(GroupDescriptor::validate_alias("my disk").is_err());
        assert!(GroupDescriptor::validate_alias("tab\there").is_err());
        assert!(GroupDescriptor::validate_alias("vm-disk_1.img").is_ok());
    }

    #[test]
    fn member_notation_matches_libdm() {
        assert_eq!(format_members(&[0]), "0");
        assert_eq!(format_members(&[0, 1]), "0-1");
        assert_eq!(format_members(&[0, 1, 2, 3, 5, 9, 10]), "0-3,5,9-10");
        assert_eq!(format_members(&[]), "");
    }

    proptest! {
        #[test]
        fn member_notation_round_trips(mut ids in proptest::collection::vec(0u64..200, 1..60)) {
            ids.sort_unstable();
            ids.dedup();
            prop_assert_eq!(parse_members(&format_members(&ids)).unwrap(), ids);
        }

        #[test]
        fn descriptors_round_trip_byte_for_byte(
            alias in "[a-zA-Z0-9_.-]{0,12}",
            quoted: bool,
            mut ids in proptest::collection::vec(0u64..500, 1..40),
            user in proptest::option::of("[a-z0-9=-]{1,8}"),
        ) {
            ids.sort_unstable();
            ids.dedup();
            let g = GroupDescriptor { alias, quoted, members: ids, user_aux: user };
            let text = g.to_string();
            prop_assert_eq!(GroupDescriptor::parse(&text).unwrap().unwrap(), g.clone());
            prop_assert_eq!(GroupDescriptor::parse(&text).unwrap().unwrap().to_string(), text);
        }
    }
}
