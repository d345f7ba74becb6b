//! The group descriptor libdm keeps in a group leader's aux_data:
//! `DMS_GROUP=<alias>:<members>#<user aux_data>`, e.g. `DMS_GROUP=img:0-3,5#-`.
//!
//! Two spellings of the alias exist: Debian's dmstats 1.02.185 writes it bare (`img:`), newer
//! lvm2 quotes it (`"img":`). We read both and write back the spelling we read, byte for byte.
use std::fmt;

use anyhow::{Context as _, ensure};

use super::id_set::IdSet;

const TAG: &str = "DMS_GROUP=";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupDescriptor {
    /// The alias as the user gave it (without quotes); may be empty.
    pub alias: String,
    /// Whether the alias was written inside double quotes.
    pub quoted: bool,
    /// Member region ids. The lowest is the leader.
    pub members: IdSet,
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
        let members = IdSet::parse(members)
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
        self.members.first()
    }

    /// A descriptor for a new set of members, keeping alias, spelling and user aux_data.
    pub fn with_members(&self, members: IdSet) -> Self {
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
        write!(f, "{}", self.members)?;
        if let Some(user) = &self.user_aux {
            write!(f, "#{user}")?;
        }
        Ok(())
    }
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
        assert_eq!(g.members.to_vec(), vec![0]);
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
        assert_eq!(g.members.to_vec(), vec![0, 1]);
        assert_eq!(g.to_string(), "DMS_GROUP=\"img\":0-1#-");
    }

    #[test]
    fn keeps_user_aux_data_and_empty_alias() {
        let g = GroupDescriptor::parse("DMS_GROUP=:3-5,9#mydata")
            .unwrap()
            .unwrap();
        assert_eq!(g.alias, "");
        assert_eq!(g.members.to_vec(), vec![3, 4, 5, 9]);
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
            g.with_members([7, 2, 3, 2].into_iter().collect())
                .to_string(),
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
        let notation = |ids: &[u64]| ids.iter().copied().collect::<IdSet>().to_string();
        assert_eq!(notation(&[0]), "0");
        assert_eq!(notation(&[0, 1]), "0-1");
        assert_eq!(notation(&[0, 1, 2, 3, 5, 9, 10]), "0-3,5,9-10");
        assert_eq!(notation(&[]), "");
    }

    proptest! {
        #[test]
        fn descriptors_round_trip_byte_for_byte(
            alias in "[a-zA-Z0-9_.-]{0,12}",
            quoted: bool,
            ids in proptest::collection::vec(0u64..500, 1..40),
            user in proptest::option::of("[a-z0-9=-]{1,8}"),
        ) {
            let g = GroupDescriptor { alias, quoted, members: ids.into_iter().collect(), user_aux: user };
            let text = g.to_string();
            prop_assert_eq!(GroupDescriptor::parse(&text).unwrap().unwrap(), g.clone());
            prop_assert_eq!(GroupDescriptor::parse(&text).unwrap().unwrap().to_string(), text);
        }
    }
}
