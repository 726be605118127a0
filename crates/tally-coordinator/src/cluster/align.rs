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
//! 2. otherwise every node must answer, none may stand in for another
//!    (a takeover open) or be mid-drain; each is **sealed** (takes no keyed
//!    increment) and hands on the records of keys another node owns in the
//!    new membership;
//! 3. each is **opened** to the new membership with the records handed on
//!    for its keys (a drained node's go to its adopter, which takes its
//!    keyed increments).
//!
//! Each keyed increment carries the membership it was routed by, and a
//! node takes it only when open to it. So no node takes a key of the new
//! membership before it holds the key's records from every node, and none
//! takes a key of the old one once it has handed its records on. An
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
    /// A change is under way: nodes are being sealed or opened.
    moving: std::sync::atomic::AtomicBool,
}

impl Default for Alignment {
    fn default() -> Self {
        Alignment {
            done: tokio::sync::watch::Sender::new((0, 0)),
            kick: tokio::sync::Notify::new(),
            blocked: parking_lot::Mutex::new(None),
            moving: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

impl Alignment {
    /// Lets the loop of a dropped cluster end.
    pub(super) fn close(&self) {
        self.kick.notify_one();
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

    /// The membership every node was open to when this cluster last
    /// checked, if no change is under way now: a node restored from its
    /// replicas opens to it (0: none, it waits for a change to open it).
    pub(super) fn settled_membership(&self) -> u64 {
        let moving = self
            .alignment
            .moving
            .load(std::sync::atomic::Ordering::SeqCst);
        if self.aligned() && !moving {
            self.keyed_stamp
        } else {
            0
        }
    }

    /// Asks for a check of every node's keyed membership and waits, up to
    /// `shard_timeout_ms`, for the next to finish: a node gave back a keyed
    /// increment for want of this membership. Err: why it could not.
    pub(super) async fn realign(&self) -> std::result::Result<(), String> {
        let mut done = self.alignment.done.subscribe();
        let (succeeded, failed) = *done.borrow_and_update();
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
        let budget = self.config.shard_timeout;
        let stamp = self.keyed_stamp;
        let statuses = join_all(
            (0..self.shards.len())
                .map(|node| self.shards[node].brief_status(self.budget_for(node, budget))),
        )
        .await;
        let open = |status: &pb::ShardStatusResponse| {
            status.keyed_ring == stamp && !status.keyed_ring_sealed
        };
        if statuses.iter().flatten().all(open) {
            return Ok(None);
        }
        let name = |node: usize| self.shards[node].node_id();
        // Where each node's keyed increments go: itself, or once drained,
        // its adopter (which checks them against its own records).
        let mut holders = Vec::with_capacity(statuses.len());
        for (node, status) in statuses.iter().enumerate() {
            let status = status
                .as_ref()
                .map_err(|error| format!("node {} does not answer ({error})", name(node)))?;
            holders.push(match status.drain_state() {
                DrainState::Drained => self
                    .shards
                    .iter()
                    .position(|shard| shard.node_id() == status.drain_adopter)
                    .unwrap_or(node),
                _ => node,
            });
            if let Some(origin) = status.standing_in_for.first() {
                return Err(format!(
                    "node {} stands in for {origin} until it has reconciled",
                    name(node)
                ));
            }
            if matches!(
                status.drain_state(),
                DrainState::Draining | DrainState::HandedOver
            ) {
                return Err(format!("node {} is being drained", name(node)));
            }
        }
        self.alignment
            .moving
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let moved = self.seal_and_open(&holders).await;
        self.alignment
            .moving
            .store(false, std::sync::atomic::Ordering::SeqCst);
        moved.map(Some)
    }

    /// Steps 2 and 3: the records handed on.
    async fn seal_and_open(&self, holders: &[usize]) -> std::result::Result<usize, String> {
        let budget = self.config.shard_timeout;
        let stamp = self.keyed_stamp;
        let name = |node: usize| self.shards[node].node_id();
        // 2. Seal every node; gather what each hands on.
        let spec = self.ring_spec();
        let sealed =
            join_all((0..self.shards.len()).map(|node| {
                self.shards[node].realign(stamp, Some(spec.clone()), Vec::new(), budget)
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
        let opened = join_all(
            handed_to
                .into_iter()
                .enumerate()
                .map(|(node, records)| self.shards[node].realign(stamp, None, records, budget)),
        )
        .await;
        for (node, result) in opened.into_iter().enumerate() {
            result.map_err(|error| format!("opening node {} failed ({error})", name(node)))?;
        }
        Ok(moved)
    }
}
