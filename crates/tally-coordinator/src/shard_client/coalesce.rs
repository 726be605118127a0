//! Merging un-keyed increments of one entry within an Apply call, and
//! spreading the merged outcome back to each part.

use crate::model::{Outcome, StripeIncrement};

/// One Apply call's increments after merging (see `apply::apply_coalesced`).
pub(super) struct Coalesced {
    /// What is sent, in order of each group's first member.
    pub(super) sent: Vec<StripeIncrement>,
    /// How to answer for each original increment.
    pub(super) members: Members,
}

/// For each original increment, in order: the sent increment that carries
/// it, and its own delta.
pub(super) struct Members {
    carrier: Vec<(u32, i64)>,
    /// Per sent increment: how many originals it carries.
    carried: Vec<u32>,
}

impl Coalesced {
    pub(super) fn plan(increments: Vec<StripeIncrement>) -> Coalesced {
        let count = increments.len();
        let mut carrier = Vec::with_capacity(count);
        let mut sums: Vec<i64> = Vec::with_capacity(count);
        let mut carried: Vec<u32> = Vec::with_capacity(count);
        {
            // Open group per (counter, stripe) of un-keyed increments.
            let mut open: std::collections::HashMap<(&str, u32), u32> =
                std::collections::HashMap::with_capacity(count);
            for increment in &increments {
                let own = |sums: &mut Vec<i64>, carried: &mut Vec<u32>| {
                    sums.push(increment.delta);
                    carried.push(1);
                    (sums.len() - 1) as u32
                };
                let group = if increment.key.is_some() || count == 1 {
                    own(&mut sums, &mut carried)
                } else {
                    let key = (increment.counter.as_str(), increment.stripe);
                    let merged = open.get(&key).and_then(|&group| {
                        let sum = sums[group as usize].checked_add(increment.delta)?;
                        sums[group as usize] = sum;
                        carried[group as usize] += 1;
                        Some(group)
                    });
                    merged.unwrap_or_else(|| {
                        // A new group, also when the open one's sum would
                        // leave i64.
                        let group = own(&mut sums, &mut carried);
                        open.insert(key, group);
                        group
                    })
                };
                carrier.push((group, increment.delta));
            }
        }
        let mut sent = Vec::with_capacity(sums.len());
        for (increment, &(group, _)) in increments.into_iter().zip(&carrier) {
            // A group's first member is the first to come by.
            if group as usize == sent.len() {
                sent.push(StripeIncrement {
                    delta: sums[group as usize],
                    ..increment
                });
            }
        }
        Coalesced {
            sent,
            members: Members { carrier, carried },
        }
    }
}

impl Members {
    /// Each original's outcome from its carrier's, and the originals that
    /// must be sent again unmerged (with their position).
    pub(super) fn spread(
        self,
        merged: Vec<Outcome>,
    ) -> (Vec<Outcome>, Vec<(usize, StripeIncrement)>) {
        let mut unmerge = Vec::new();
        let outcomes = self
            .carrier
            .iter()
            .enumerate()
            .map(|(position, &(group, delta))| {
                let outcome = &merged[group as usize];
                if self.carried[group as usize] == 1 {
                    return outcome.clone();
                }
                match outcome {
                    // Merged parts have no key: a duplicate cannot come
                    // back for them.
                    Outcome::Applied | Outcome::Duplicate => Outcome::Applied,
                    // Only keyed increments are refused so.
                    Outcome::Unavailable(why) => Outcome::Unavailable(why.clone()),
                    Outcome::Expired(why) => Outcome::Expired(why.clone()),
                    Outcome::AwaitsRestore(increment) => Outcome::AwaitsRestore(StripeIncrement {
                        delta,
                        ..increment.clone()
                    }),
                    Outcome::OwnerBack(increment) => Outcome::OwnerBack(StripeIncrement {
                        delta,
                        ..increment.clone()
                    }),
                    Outcome::RingRefused {
                        increment,
                        ring,
                        sealed,
                    } => Outcome::RingRefused {
                        increment: StripeIncrement {
                            delta,
                            ..increment.clone()
                        },
                        ring: *ring,
                        sealed: *sealed,
                    },
                    Outcome::Redirect(increment) => Outcome::Redirect(StripeIncrement {
                        delta,
                        ..increment.clone()
                    }),
                    // Only un-keyed increments are merged: a conflict
                    // cannot come back for a merged one; resend it alone
                    // like an overflow rather than guess.
                    Outcome::Overflow(increment) | Outcome::KeyConflict { increment, .. } => {
                        unmerge.push((
                            position,
                            StripeIncrement {
                                delta,
                                key: None,
                                ..increment.clone()
                            },
                        ));
                        Outcome::Applied // replaced by the second call's answer
                    }
                }
            })
            .collect();
        (outcomes, unmerge)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_proto::pb;

    fn increment(counter: &str, stripe: u32, delta: i64, key: &str) -> StripeIncrement {
        StripeIncrement::try_from(pb::ShardIncrement {
            counter: counter.into(),
            stripe,
            delta,
            idempotency_key: key.into(),
            ..Default::default()
        })
        .unwrap()
    }

    #[test]
    fn unkeyed_increments_of_one_entry_merge_and_keyed_ones_do_not() {
        let plan = Coalesced::plan(vec![
            increment("a", 0, 1, ""),
            increment("a", 1, 2, ""),
            increment("a", 0, 3, ""),
            increment("a", 0, 4, "k1"),
            increment("b", 0, 5, ""),
            increment("a", 0, 6, ""),
            increment("a", 0, 7, "k1"),
        ]);
        assert_eq!(
            plan.sent,
            vec![
                increment("a", 0, 10, ""),
                increment("a", 1, 2, ""),
                increment("a", 0, 4, "k1"),
                increment("b", 0, 5, ""),
                increment("a", 0, 7, "k1"),
            ]
        );
        assert_eq!(
            plan.members.carrier,
            vec![(0, 1), (1, 2), (0, 3), (2, 4), (3, 5), (0, 6), (4, 7)]
        );
        assert_eq!(plan.members.carried, vec![3, 1, 1, 1, 1]);
    }

    #[test]
    fn a_sum_that_would_leave_i64_starts_a_new_group() {
        let plan = Coalesced::plan(vec![
            increment("a", 0, i64::MAX, ""),
            increment("a", 0, 1, ""),
            increment("a", 0, -5, ""),
        ]);
        assert_eq!(
            plan.sent,
            vec![increment("a", 0, i64::MAX, ""), increment("a", 0, -4, "")]
        );
    }

    #[test]
    fn merged_outcomes_spread_to_every_part() {
        let plan = Coalesced::plan(vec![
            increment("a", 0, 1, ""),
            increment("a", 0, 2, ""),
            increment("b", 3, 5, ""),
            increment("b", 3, -1, ""),
            increment("c", 0, 9, ""),
        ]);
        let (outcomes, unmerge) = plan.members.spread(vec![
            Outcome::Applied,
            Outcome::Redirect(increment("b", 3, 4, "")),
            Outcome::Overflow(increment("c", 0, 9, "")),
        ]);
        assert_eq!(
            outcomes[..4],
            [
                Outcome::Applied,
                Outcome::Applied,
                Outcome::Redirect(increment("b", 3, 5, "")),
                Outcome::Redirect(increment("b", 3, -1, "")),
            ]
        );
        // Not merged: its own overflow stands.
        assert_eq!(outcomes[4], Outcome::Overflow(increment("c", 0, 9, "")));
        assert!(unmerge.is_empty());
    }

    #[test]
    fn a_merged_overflow_sends_its_parts_again_alone() {
        let plan = Coalesced::plan(vec![
            increment("x", 1, 7, ""),
            increment("a", 2, 1, ""),
            increment("a", 2, 2, ""),
        ]);
        let (_, unmerge) = plan.members.spread(vec![
            Outcome::Applied,
            Outcome::Overflow(increment("a", 2, 3, "")),
        ]);
        assert_eq!(
            unmerge,
            vec![(1, increment("a", 2, 1, "")), (2, increment("a", 2, 2, ""))]
        );
    }
}
