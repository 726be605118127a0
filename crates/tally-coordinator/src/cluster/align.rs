//! Keyed increments follow the membership. A keyed increment goes to its
//! key's owner on the ring, which remembers the key; when the membership
//! changes (a node added, a drained node removed), some keys get a new
//! owner, and a retry straddling the change would reach a node that never
//! saw the key. So before any node takes keyed increments of a new
//! membership, every node hands on the records of keys it no longer owns
//! (the shard side is `tally-shard`'s `service::ring`):
//!
//! 1. every node is asked its keyed membership; if all that answer are
//!    open to this cluster's, there is nothing to do;
//! 2. otherwise every node must answer (one awaiting its restore is
//!    restored first), none may stand in for another (a takeover open) or
//!    be mid-drain; the change takes a number (`change_number`), and each
//!    node is **sealed** (takes no keyed increment) and hands on the
//!    records of keys another node owns in the new membership;
//! 3. each is **opened** to the new membership with the records handed on
//!    for its keys (a drained node's go to its adopter, which takes its
//!    keyed increments).
//!
//! Each keyed increment carries the membership it was routed by, and a
//! node takes it only when open to it. So no node takes a key of the new
//! membership before it holds the key's records from every node, and none
//! takes a key of the old one once it has handed its records on. The
//! numbers keep two changes at once from both opening nodes (the shard
//! refuses a seal below its number and an open of another change). An
//! interrupted change is finished by the next (every step repeats safely).
//! A change runs when a cluster is built (start, reload) and when a node
//! gives back a keyed increment for want of a membership.

use std::sync::{Arc, Weak};
use std::time::Duration;

use futures::future::join_all;
use tally_proto::pb;

use super::Cluster;
use crate::model::DrainState;

/// Where this coordinator's change of keyed membership stands.
#[derive(Debug)]
pub(super) struct Alignment {
    /// Checks finished: (succeeded, failed). Success: every node open to
    /// this membership (moved there, or found there).
    done: tokio::sync::watch::Sender<(u64, u64)>,
    /// Asks for a check (and a change, if needed) now.
    kick: tokio::sync::Notify,
    /// Why the last attempt could not finish, if it could not.
    blocked: parking_lot::Mutex<Option<String>>,
    /// The cluster was replaced by a reload: it changes nothing any more
    /// (calls still in flight on it must not start a change of their
    /// own against the new cluster's).
    retired: std::sync::atomic::AtomicBool,
}

impl Default for Alignment {
    fn default() -> Self {
        Alignment {
            done: tokio::sync::watch::Sender::new((0, 0)),
            kick: tokio::sync::Notify::new(),
            blocked: parking_lot::Mutex::new(None),
            retired: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

impl Alignment {
    /// Lets the loop of a dropped or replaced cluster end.
    pub(super) fn close(&self) {
        self.retired
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.kick.notify_one();
    }

    fn is_retired(&self) -> bool {
        self.retired.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Runs the cluster's changes of keyed membership: one at once, then one
/// each time it is asked for, retried every `retry` until it succeeds.
pub(super) async fn align_loop(cluster: Weak<Cluster>, alignment: Arc<Alignment>, retry: Duration) {
    let mut last_logged: Option<String> = None;
    loop {
        let Some(strong) = cluster.upgrade() else {
            return;
        };
        if alignment.is_retired() {
            return;
        }
        match strong.align().await {
            Ok(moved) => {
                *alignment.blocked.lock() = None;
                last_logged = None;
                let ring = format!("{:016x}", strong.keyed_stamp);
                let first = alignment.done.borrow().0 == 0;
                match moved {
                    Some(records) => tracing::info!(
                        %ring,
                        records,
                        "keyed increments moved to this membership: every node open to it"
                    ),
                    None if first => tracing::info!(
                        %ring,
                        "keyed increments of this membership: every node open to it"
                    ),
                    None => {}
                }
                alignment.done.send_modify(|(succeeded, _)| *succeeded += 1);
                drop(strong);
                alignment.kick.notified().await;
            }
            Err(why) => {
                if last_logged.as_ref() != Some(&why) {
                    tracing::warn!(
                        ring = format_args!("{:016x}", strong.keyed_stamp),
                        "keyed increments wait for a membership change: {why}; will retry"
                    );
                    last_logged = Some(why.clone());
                }
                *alignment.blocked.lock() = Some(why);
                alignment.done.send_modify(|(_, failed)| *failed += 1);
                drop(strong);
                tokio::select! {
                    () = tokio::time::sleep(retry) => {}
                    () = alignment.kick.notified() => {}
                }
            }
        }
    }
}

impl Cluster {
    /// The membership keyed increments are routed by, in the form nodes
    /// check it.
    fn ring_spec(&self) -> pb::RingSpec {
        pb::RingSpec {
            members: self
                .ring
                .nodes()
                .iter()
                .map(|node| pb::RingMember {
                    id: node.id.clone(),
                    weight: node.weight,
                })
                .collect(),
            vnodes_per_weight: self.ring.vnodes_per_weight(),
            stripes: self.config.stripes,
        }
    }

    /// Whether this cluster has moved keyed increments to its membership
    /// (or found them there) at least once.
    pub(super) fn aligned(&self) -> bool {
        self.alignment.done.borrow().0 > 0
    }

    /// Asks for a check of every node's keyed membership and waits, up to
    /// `shard_timeout_ms`, for the next to finish: a node gave back a keyed
    /// increment for want of this membership. Err: why it could not.
    pub(super) async fn realign(&self) -> std::result::Result<(), String> {
        let mut done = self.alignment.done.subscribe();
        let (succeeded, failed) = *done.borrow_and_update();
        if self.retired() {
            return Err("this coordinator's membership was reloaded; retry".into());
        }
        self.alignment.kick.notify_one();
        let finished = tokio::time::timeout(
            self.config.shard_timeout,
            done.wait_for(|&now| now != (succeeded, failed)),
        )
        .await;
        match finished {
            Ok(Ok(now)) if now.0 > succeeded => Ok(()),
            _ => Err(self
                .alignment
                .blocked
                .lock()
                .clone()
                .unwrap_or_else(|| "a membership change is still under way".into())),
        }
    }

    /// One check, and the change if needed (see the module docs). Ok: the
    /// records handed on, or None when every node that answered was open
    /// to this membership already.
    async fn align(&self) -> std::result::Result<Option<usize>, String> {
        let stamp = self.keyed_stamp;
        let statuses = self.statuses().await;
        let open = |status: &pb::ShardStatusResponse| {
            status.keyed_ring == stamp && !status.keyed_ring_sealed
        };
        if statuses.iter().flatten().all(open) {
            return Ok(None);
        }
        let mut statuses_now = self.every_status(statuses)?;
        // A node that started empty gets its records back first (the
        // replication loop would within a round): its seal must hand on
        // what it held.
        let restoring: Vec<usize> = (0..statuses_now.len())
            .filter(|&node| statuses_now[node].restoring)
            .collect();
        if !restoring.is_empty() {
            let asked = std::time::Instant::now();
            for node in restoring {
                self.restore_for_write(node, asked).await;
            }
            statuses_now = self.every_status(self.statuses().await)?;
            // Its restore opened it to what every other node is open to.
            if statuses_now.iter().all(open) {
                return Ok(None);
            }
        }
        let name = |node: usize| self.shards[node].node_id();
        if let Some(why) = self.change_blocked_by(&statuses_now) {
            return Err(why);
        }
        // Where each node's keyed increments go: itself, or once drained,
        // its adopter (which checks them against its own records).
        let holders = statuses_now
            .iter()
            .enumerate()
            .map(|(node, status)| match status.drain_state() {
                DrainState::Drained => self
                    .shards
                    .iter()
                    .position(|shard| shard.node_id() == status.drain_adopter)
                    .ok_or_else(|| {
                        format!(
                            "node {} is drained, and its adopter {:?} is not in the membership",
                            name(node),
                            status.drain_adopter
                        )
                    }),
                _ => Ok(node),
            })
            .collect::<std::result::Result<Vec<usize>, String>>()?;
        let epoch = change_number(&statuses_now, stamp);
        self.seal_and_open(epoch, &holders).await.map(Some)
    }

    /// Why keyed increments could not move from this cluster's membership
    /// to `config`'s now, as this coordinator's probes see the nodes that
    /// stay (a reload is refused for it rather than leave every keyed
    /// increment waiting for the node).
    pub(super) fn keys_cannot_move(
        &self,
        config: &crate::config::CoordinatorConfig,
    ) -> Option<String> {
        (0..self.shards.len()).find_map(|node| {
            let name = self.shards[node].node_id();
            // A drained node leaving is not asked: its records are with its
            // adopter.
            config.node(name)?;
            if !self.health.is_up(node) {
                return Some(format!("node {name} is down"));
            }
            blocker(
                name,
                self.health.standing_in_for(node).first(),
                self.health.drain(node),
                self.health.is_restoring(node),
            )
        })
    }

    /// This cluster was replaced by a reload: it starts no change of keyed
    /// membership any more.
    pub(super) fn retire(&self) {
        self.alignment.close();
    }

    /// Whether a reload replaced this cluster.
    pub(super) fn retired(&self) -> bool {
        self.alignment.is_retired()
    }

    /// The membership and change number every node but `node` is open to,
    /// if this coordinator's and one change's; (0, 0) otherwise: a node
    /// restored from its replicas opens to it (see the shard's Restore).
    pub(super) async fn membership_of_the_others(&self, node: usize) -> (u64, u64) {
        let mut epochs = self
            .statuses()
            .await
            .into_iter()
            .enumerate()
            .filter(|(other, _)| *other != node)
            .map(|(_, status)| match status {
                Ok(status)
                    if status.keyed_ring == self.keyed_stamp && !status.keyed_ring_sealed =>
                {
                    Some(status.keyed_ring_epoch)
                }
                _ => None,
            });
        match epochs.next().flatten() {
            Some(epoch) if epochs.all(|other| other == Some(epoch)) => (self.keyed_stamp, epoch),
            _ => (0, 0),
        }
    }

    /// Every node's brief status.
    async fn statuses(
        &self,
    ) -> Vec<std::result::Result<pb::ShardStatusResponse, crate::error::ShardCallError>> {
        let budget = self.config.shard_timeout;
        join_all(
            (0..self.shards.len())
                .map(|node| self.shards[node].brief_status(self.budget_for(node, budget))),
        )
        .await
    }

    /// Every node's status, or which node did not answer.
    fn every_status(
        &self,
        statuses: Vec<std::result::Result<pb::ShardStatusResponse, crate::error::ShardCallError>>,
    ) -> std::result::Result<Vec<pb::ShardStatusResponse>, String> {
        statuses
            .into_iter()
            .enumerate()
            .map(|(node, status)| {
                status.map_err(|error| {
                    format!(
                        "node {} does not answer ({error})",
                        self.shards[node].node_id()
                    )
                })
            })
            .collect()
    }

    /// Why no change of keyed membership can run now, from the nodes'
    /// statuses (each node checks again as it is sealed): a node standing
    /// in for another (its takeover must be reconciled first), being
    /// drained, or awaiting its restore.
    pub(super) fn change_blocked_by(&self, statuses: &[pb::ShardStatusResponse]) -> Option<String> {
        statuses.iter().enumerate().find_map(|(node, status)| {
            blocker(
                self.shards[node].node_id(),
                status.standing_in_for.first(),
                status.drain_state(),
                status.restoring,
            )
        })
    }

    /// Steps 2 and 3: the records handed on.
    async fn seal_and_open(
        &self,
        epoch: u64,
        holders: &[usize],
    ) -> std::result::Result<usize, String> {
        let budget = self.config.shard_timeout;
        let stamp = self.keyed_stamp;
        let name = |node: usize| self.shards[node].node_id();
        // 2. Seal every node; gather what each hands on.
        let spec = self.ring_spec();
        let sealed = join_all((0..self.shards.len()).map(|node| {
            self.shards[node].realign(stamp, epoch, Some(spec.clone()), Vec::new(), budget)
        }))
        .await;
        let mut handed_to: Vec<Vec<pb::KeyRecord>> = vec![Vec::new(); self.shards.len()];
        let mut moved = 0;
        for (node, records) in sealed.into_iter().enumerate() {
            let records =
                records.map_err(|error| format!("sealing node {} failed ({error})", name(node)))?;
            moved += records.len();
            for record in records {
                let owner = self
                    .ring
                    .key_owner(&record.counter, &record.key, self.config.stripes);
                handed_to[holders[owner]].push(record);
            }
        }
        // 3. Open every node, with the records for its keys.
        let opened =
            join_all(handed_to.into_iter().enumerate().map(|(node, records)| {
                self.shards[node].realign(stamp, epoch, None, records, budget)
            }))
            .await;
        for (node, result) in opened.into_iter().enumerate() {
            result.map_err(|error| format!("opening node {} failed ({error})", name(node)))?;
        }
        Ok(moved)
    }
}

/// What keeps node `name` from a change of keyed membership, if anything:
/// standing in for another node (its takeover must be reconciled first),
/// being drained, or awaiting its restore. The nodes' own statuses say it
/// before a change; the health board before a reload.
fn blocker(
    name: &str,
    standing_in_for: Option<&String>,
    drain: DrainState,
    restoring: bool,
) -> Option<String> {
    if let Some(origin) = standing_in_for {
        Some(format!(
            "node {name} stands in for {origin} until it has reconciled"
        ))
    } else if matches!(drain, DrainState::Draining | DrainState::HandedOver) {
        Some(format!("node {name} is being drained"))
    } else if restoring {
        Some(format!("node {name} awaits its restore"))
    } else {
        None
    }
}

/// The number of a change to membership `stamp`, from every node's status:
/// the highest number any node has seen, joined, if every node at it is at
/// this membership (another coordinator of the same membership is making
/// this very change, or it was interrupted: both finish it, neither
/// supersedes the other); otherwise one above it, which supersedes a change
/// to another membership wherever it seals.
fn change_number(statuses: &[pb::ShardStatusResponse], stamp: u64) -> u64 {
    let highest = statuses
        .iter()
        .map(|status| status.keyed_ring_epoch)
        .max()
        .unwrap_or(0);
    let joinable = highest > 0
        && statuses
            .iter()
            .filter(|status| status.keyed_ring_epoch == highest)
            .all(|status| status.keyed_ring == stamp);
    if joinable {
        highest
    } else {
        highest + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ring: u64, epoch: u64, sealed: bool) -> pb::ShardStatusResponse {
        pb::ShardStatusResponse {
            keyed_ring: ring,
            keyed_ring_epoch: epoch,
            keyed_ring_sealed: sealed,
            ..Default::default()
        }
    }

    #[test]
    fn a_change_joins_one_of_its_membership_and_supersedes_others() {
        // Nodes that know none: the first change.
        assert_eq!(change_number(&[at(0, 0, false), at(0, 0, false)], 7), 1);
        // Another coordinator of the same membership is sealing: join it.
        assert_eq!(change_number(&[at(7, 3, true), at(5, 2, false)], 7), 3);
        // Opened to it already on some node, another lost its directory.
        assert_eq!(change_number(&[at(7, 3, false), at(0, 0, false)], 7), 3);
        // Another membership at the highest number: supersede it.
        assert_eq!(change_number(&[at(9, 3, true), at(7, 2, false)], 7), 4);
        // Both memberships at the highest number: supersede, never join
        // (its seals would be refused where the other sealed first).
        assert_eq!(change_number(&[at(7, 3, true), at(9, 3, true)], 7), 4);
    }
}
