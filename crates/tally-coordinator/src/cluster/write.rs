//! Increments: which stripe and node each goes to, the calls to the nodes,
//! and what their outcomes mean for the client.

use crate::metrics::Redirect;
use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};

use futures::future::join_all;
use tally_proto::domain::{IdempotencyKey, Increment};
use tokio::time::Instant;

use super::{with_deadline, Cluster};
use crate::error::{CoordinatorError, Result, ShardCallError};
use crate::model::{DrainState, Outcome, StripeIncrement};
use crate::placement::Target;

/// How many times one call waits for a membership change of keyed
/// increments (`Cluster::realign`) before it fails `UNAVAILABLE`.
const MEMBERSHIP_WAITS: usize = 3;

thread_local! {
    /// Next stripe for increments without an idempotency key. Per thread, so
    /// spreading load does not itself contend on one shared counter.
    static NEXT_STRIPE: Cell<u32> = Cell::new(xxhash_rust::xxh3::xxh3_64(
        format!("{:?}", std::thread::current().id()).as_bytes(),
    ) as u32);
}

impl Cluster {
    /// The stripe an increment goes to: fixed by its idempotency key, so a
    /// retry reaches the node that can deduplicate it; otherwise rotating,
    /// so one hot counter spreads over every stripe and so every node.
    fn stripe_for(&self, increment: &Increment) -> u32 {
        match &increment.idempotency_key {
            Some(key) => tally_ring::idempotency_stripe(key.as_str(), self.config.stripes),
            None => NEXT_STRIPE.with(|next| {
                let stripe = next.get();
                next.set(stripe.wrapping_add(1));
                stripe % self.config.stripes
            }),
        }
    }

    /// Applies validated increments, each on its own. Returns once all are
    /// durable (with how many were retries of keys applied before), or the
    /// first overflow, or every node that failed.
    pub async fn increment(
        &self,
        increments: Vec<Increment>,
        deadline: Option<Instant>,
    ) -> Result<usize> {
        let mut by_node = self.route(increments);
        let mut unavailable = Vec::new();
        let mut refused = None;
        let mut deduplicated = 0;
        // A node that began a drain after this call was routed sends its
        // increments back unapplied: route them again, once. So does a node
        // that started empty with keyed increments, until it is restored:
        // restore it now (the replication loop would within a round) and
        // send them again, once.
        let mut restore = std::collections::BTreeSet::new();
        // Owners whose stand-in gave their keyed increments back: they are
        // back, though this coordinator may not have seen it yet.
        let mut back = std::collections::BTreeSet::new();
        // Keyed increments a node gave back for want of this membership:
        // sent again once this coordinator has moved keyed increments to
        // it (`align`).
        let mut wait_for_membership: Vec<(usize, StripeIncrement)> = Vec::new();
        let asked = std::time::Instant::now();
        // A restore at most once per call, and a membership change at most
        // `MEMBERSHIP_WAITS` times: a node that started empty may need
        // both, in turn (restored, then opened to this membership), and
        // two coordinators of one membership starting together may each
        // seal the nodes the other just opened.
        let (mut restored, mut realigned) = (false, 0);
        for round in 0..2 + MEMBERSHIP_WAITS {
            for node in std::mem::take(&mut restore) {
                restored = true;
                with_deadline(deadline, self.restore_for_write(node, asked)).await?;
            }
            if !wait_for_membership.is_empty() {
                realigned += 1;
                let waiting = std::mem::take(&mut wait_for_membership);
                match with_deadline(deadline, self.realign()).await? {
                    Ok(()) => {
                        for (node, increment) in waiting {
                            by_node.entry(node).or_default().push(increment);
                        }
                    }
                    Err(why) => {
                        for (node, _) in waiting {
                            unavailable.push((
                                self.shards[node].node_id().to_string(),
                                ShardCallError::Failed(format!(
                                    "keyed increments wait for a membership change: {why}"
                                )),
                            ));
                        }
                    }
                }
            }
            for owner in std::mem::take(&mut back) {
                with_deadline(deadline, self.wait_until_seen_up(owner)).await?;
            }
            let calls = std::mem::take(&mut by_node);
            let mut settle = |node: usize, result: std::result::Result<Vec<Outcome>, _>| {
                self.observe(node, &result);
                match result {
                    Ok(outcomes) => {
                        for outcome in outcomes {
                            match outcome {
                                Outcome::Redirect(mut increment) if round == 0 => {
                                    self.health.set_drain(node, DrainState::Draining);
                                    let again = self.target(
                                        increment.counter.as_str(),
                                        increment.stripe,
                                        increment.key.is_some(),
                                    );
                                    if again.node == node {
                                        // A keyed one whose owner has not
                                        // handed its records over yet: it
                                        // has nowhere else to go.
                                        unavailable.push((
                                            self.shards[node].node_id().to_string(),
                                            ShardCallError::Failed("being drained".into()),
                                        ));
                                        continue;
                                    }
                                    self.stand_in_for(&mut increment, again);
                                    self.node_metrics(node).redirected(Redirect::Draining, 1);
                                    by_node.entry(again.node).or_default().push(increment);
                                }
                                Outcome::Redirect(_) => unavailable.push((
                                    self.shards[node].node_id().to_string(),
                                    ShardCallError::Failed("being drained".into()),
                                )),
                                Outcome::Applied => {}
                                Outcome::Duplicate => deduplicated += 1,
                                Outcome::AwaitsRestore(increment) if !restored => {
                                    restore.insert(node);
                                    self.node_metrics(node)
                                        .redirected(Redirect::AwaitsRestore, 1);
                                    by_node.entry(node).or_default().push(increment);
                                }
                                Outcome::Unavailable(why) => {
                                    self.probe_owners_stood_in_for_by(node);
                                    unavailable.push((
                                        self.shards[node].node_id().to_string(),
                                        ShardCallError::Failed(why),
                                    ));
                                }
                                Outcome::OwnerBack(mut increment) if round == 0 => {
                                    // Its stand-in closed the takeover: the
                                    // owner is back and reconciling, and
                                    // applies each key once from now on.
                                    let owner = self
                                        .ring
                                        .owner(increment.counter.as_str(), increment.stripe);
                                    increment.on_behalf_of = None;
                                    increment.takeover_max_copy_age_ms = 0;
                                    back.insert(owner);
                                    self.node_metrics(node).redirected(Redirect::OwnerBack, 1);
                                    by_node.entry(owner).or_default().push(increment);
                                }
                                Outcome::RingRefused {
                                    increment,
                                    ring,
                                    sealed,
                                } => match self.other_membership(ring, sealed) {
                                    None if realigned < MEMBERSHIP_WAITS => {
                                        self.node_metrics(node).redirected(Redirect::Membership, 1);
                                        wait_for_membership.push((node, increment))
                                    }
                                    why => unavailable.push((
                                        self.shards[node].node_id().to_string(),
                                        ShardCallError::Failed(why.unwrap_or_else(|| {
                                            "a membership change is under way; retry".into()
                                        })),
                                    )),
                                },
                                Outcome::OwnerBack(_) => unavailable.push((
                                    self.shards[node].node_id().to_string(),
                                    ShardCallError::Failed(
                                        "its owner is back and reconciling; retry".into(),
                                    ),
                                )),
                                Outcome::AwaitsRestore(_) => unavailable.push((
                                    self.shards[node].node_id().to_string(),
                                    ShardCallError::Failed(
                                        "started with an empty data directory and still awaits \
                                         the restore of its idempotency records"
                                            .into(),
                                    ),
                                )),
                                other => {
                                    if refused.is_none() {
                                        refused = refusal(other);
                                    }
                                }
                            }
                        }
                    }
                    Err(error) => {
                        unavailable.push((self.shards[node].node_id().to_string(), error))
                    }
                }
            };
            if calls.len() == 1 {
                // One node (every unary call): nothing to fan out and join.
                let (node, increments) = calls.into_iter().next().expect("one node");
                settle(
                    node,
                    with_deadline(deadline, self.apply_on(node, increments)).await?,
                );
            } else {
                let calls = calls.into_iter().map(|(node, increments)| async move {
                    (node, self.apply_on(node, increments).await)
                });
                for (node, result) in with_deadline(deadline, join_all(calls)).await? {
                    settle(node, result);
                }
            }
            if by_node.is_empty() && wait_for_membership.is_empty() {
                break;
            }
        }
        // Out of rounds with increments still to send: not applied, never
        // a silent success.
        let unsent = by_node
            .keys()
            .copied()
            .chain(wait_for_membership.iter().map(|(node, _)| *node));
        for node in unsent {
            unavailable.push((
                self.shards[node].node_id().to_string(),
                ShardCallError::Failed("gave back more than once; retry".into()),
            ));
        }
        // UNAVAILABLE first: part of the call was not applied and the client
        // should retry; an overflow or key conflict is reported once every
        // node answered.
        if !unavailable.is_empty() {
            return Err(CoordinatorError::Unavailable(unavailable));
        }
        match refused {
            Some(error) => Err(error),
            None => Ok(deduplicated),
        }
    }

    /// Why a node's keyed membership `ring` (`sealed`: a change to it
    /// under way) is another coordinator's, not one this coordinator should
    /// move to its own: it already moved keyed increments to its own
    /// once, so another coordinator changed them since, to a membership
    /// this one's config does not have. None: a node that knows none yet,
    /// or one this coordinator has not moved yet (just started or
    /// reloaded): this coordinator moves them.
    fn other_membership(&self, ring: u64, sealed: bool) -> Option<String> {
        if self.retired() {
            return Some("this coordinator's membership was reloaded; retry".into());
        }
        if ring == 0 || ring == self.keyed_stamp || !self.aligned() {
            return None;
        }
        Some(if sealed {
            format!(
                "keyed increments are moving to another membership ({ring:016x}) than this \
                 coordinator's ({:016x}); retry, and reload this coordinator if it persists",
                self.keyed_stamp
            )
        } else {
            format!(
                "the shard nodes take keyed increments of another membership ({ring:016x}) than \
                 this coordinator's ({:016x}): another coordinator changed it; reload this one \
                 with the same membership (SIGHUP)",
                self.keyed_stamp
            )
        })
    }

    /// Node `node`'s share of a call. Only a keyed increment (which stays
    /// with its owner) or a cluster with every node down reaches a node
    /// shown down: it is not sent, and fails at once with UNAVAILABLE. Sent,
    /// it would queue behind the calls still hanging on that node and hold
    /// its caller for the shard timeout, past most clients' deadlines. The
    /// node's probes find it when it is back.
    async fn apply_on(
        &self,
        node: usize,
        increments: Vec<StripeIncrement>,
    ) -> std::result::Result<Vec<Outcome>, ShardCallError> {
        // Found hung while the call waits: fail it now, in doubt, as its
        // timeout would later; the caller's retry goes where the node's
        // writes go meanwhile (around it, or to its stand-in). Watched
        // before the check, so a node found hung in between is caught.
        let found_hung = self.health.found_hung(node);
        if !self.health.is_up(node) {
            return Err(ShardCallError::Down(self.health.get(node).error));
        }
        tokio::select! {
            biased;
            answer = self.shards[node].apply(increments) => answer,
            () = found_hung => Err(ShardCallError::Abandoned(self.health.get(node).error)),
        }
    }

    /// Where each increment goes, grouped by node: one batcher job per node
    /// per call. Ordered, so which error is reported does not depend on
    /// hashing.
    fn route(&self, increments: Vec<Increment>) -> BTreeMap<usize, Vec<StripeIncrement>> {
        let mut by_node: BTreeMap<usize, Vec<StripeIncrement>> = BTreeMap::new();
        if increments.len() == 1 {
            // A unary call: no other increment to share a placement with.
            let increment = increments.into_iter().next().expect("one increment");
            let stripe = self.stripe_for(&increment);
            let keyed = increment.idempotency_key.is_some();
            let target = self.target(increment.counter.as_str(), stripe, keyed);
            by_node.insert(target.node, vec![self.placed(increment, stripe, target)]);
            return by_node;
        }
        // Un-keyed increments of a counter seen earlier in this call take
        // the same stripe: one ring lookup per counter per call, and the
        // batcher merges them into one (load still rotates over stripes
        // from call to call). Profiling a batch of 100 on one hot counter
        // showed ring lookups as the coordinator's top symbol (7%).
        let placements = {
            let mut placed: HashMap<&str, (u32, Target)> = HashMap::new();
            increments
                .iter()
                .map(|increment| {
                    let keyed = increment.idempotency_key.is_some();
                    let counter = increment.counter.as_str();
                    if let Some(&earlier) = placed.get(counter).filter(|_| !keyed) {
                        return earlier;
                    }
                    let stripe = self.stripe_for(increment);
                    let target = self.target(counter, stripe, keyed);
                    if !keyed {
                        placed.insert(counter, (stripe, target));
                    }
                    (stripe, target)
                })
                .collect::<Vec<_>>()
        };
        for (increment, (stripe, target)) in increments.into_iter().zip(placements) {
            by_node
                .entry(target.node)
                .or_default()
                .push(self.placed(increment, stripe, target));
        }
        by_node
    }
}

/// The error an increment's outcome stands for, if it was refused.
fn refusal(outcome: Outcome) -> Option<CoordinatorError> {
    match outcome {
        Outcome::Applied
        | Outcome::Duplicate
        | Outcome::Redirect(_)
        | Outcome::AwaitsRestore(_)
        | Outcome::OwnerBack(_)
        | Outcome::RingRefused { .. }
        | Outcome::Unavailable(_) => None,
        Outcome::Overflow(increment) => Some(CoordinatorError::IncrementOverflow {
            counter: tally_proto::window::describe(increment.counter.as_str()),
            delta: increment.delta,
        }),
        Outcome::Expired(why) => Some(CoordinatorError::WindowEnded(why)),
        Outcome::KeyConflict {
            increment,
            recorded_delta,
        } => Some(CoordinatorError::KeyConflict {
            counter: tally_proto::window::describe(increment.counter.as_str()),
            key: increment
                .key
                .map(IdempotencyKey::into_string)
                .unwrap_or_default(),
            delta: increment.delta,
            recorded_delta,
        }),
    }
}
