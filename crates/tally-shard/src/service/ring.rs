//! Membership changes of keyed increments: which node takes a key's
//! increments, and so holds its idempotency record, follows the ring. When
//! the membership changes, a key's new owner must hold the record its old
//! owner made before it takes the key's increments, and the old owner must
//! take none after handing its records on. The coordinator changing the
//! membership does it in two steps on every node (`Realign`):
//!
//! 1. **Seal**: the node takes no keyed increment from then on (logged, so
//!    also after a restart) and hands on every record it holds of a key
//!    another node owns in the new membership, once its log holds them.
//! 2. **Open**, once every node is sealed: the node adds the records handed
//!    on for its keys, and takes keyed increments of the new membership
//!    only.
//!
//! Every keyed increment carries its sender's membership (its keyed
//! placement stamp); a node takes it only when open to that membership, and
//! gives it back otherwise (`ring_refused`). So a key's increments are
//! taken by one node per membership, and by a node of a new membership only
//! once the records of every earlier owner are with it.
//!
//! Each change has a number (its epoch), above every number the nodes
//! reported when it began. A node refuses a seal below its number, or of
//! another membership at its number, and an open of any change but the one
//! it is sealed for. So of two changes at once (two coordinators with
//! different files), the one with the higher number supersedes the other
//! on each node it seals, the other can open none of those, and no two
//! nodes are ever open to different memberships at once.

use tally_proto::pb;
use tally_ring::{NodeSpec, Ring};

use super::{records, records_to_wire, ShardService};
use crate::change::{Change, OwnChange};
use crate::meta::{DrainState, KeyedRing};
use crate::refusal::Refusal;

impl ShardService {
    pub(super) async fn realign_to_the_end(
        &self,
        request: pb::RealignRequest,
    ) -> Result<pb::RealignResponse, Refusal> {
        self.check_node_id(&request.node_id)?;
        if request.ring == 0 || request.epoch == 0 {
            return Err(Refusal::InvalidRequest(
                "a membership change names no membership (ring 0) or no number (epoch 0)".into(),
            ));
        }
        let change = KeyedRing {
            stamp: request.ring,
            sealed: true,
            epoch: request.epoch,
        };
        match (request.seal, request.open) {
            (Some(membership), false) => self.seal(change, membership).await,
            (None, true) => {
                let records = records(request.records)?;
                self.open(change, records).await?;
                Ok(pb::RealignResponse::default())
            }
            _ => Err(Refusal::InvalidRequest(
                "a membership change either seals or opens".into(),
            )),
        }
    }

    fn membership_change(&self, message: String) -> Refusal {
        Refusal::MembershipChange {
            node: self.node_id.to_string(),
            message,
        }
    }

    /// Step 1: takes no more keyed increments, and hands on the records of
    /// keys another node owns in `membership`. Repeatable.
    async fn seal(
        &self,
        sealed: KeyedRing,
        membership: pb::RingSpec,
    ) -> Result<pb::RealignResponse, Refusal> {
        let ring = ring_of(&membership, sealed.stamp)?;
        let this = ring.node_index(&self.node_id);
        let stripes = membership.stripes;
        // Alone, to seal: no keyed apply is half done, and none begins on
        // the old membership after (each checks under the shared lock).
        let paused = self.own_writes.write().await;
        let current = {
            let meta = self.state.meta.lock();
            if let Some(origin) = meta.standing_in_for.keys().next() {
                return Err(self.membership_change(format!(
                    "it stands in for {origin}: a membership change waits until {origin} has \
                     reconciled"
                )));
            }
            if meta.awaiting_restore {
                return Err(self.membership_change(
                    "it awaits the restore of its records: a membership change waits for it".into(),
                ));
            }
            if matches!(
                meta.drain,
                DrainState::Draining | DrainState::HandedOver { .. }
            ) {
                return Err(self.membership_change(
                    "it is being drained: a membership change waits until its drain is done".into(),
                ));
            }
            meta.keyed_ring
        };
        if sealed.epoch < current.epoch
            || (sealed.epoch == current.epoch && sealed.stamp != current.stamp)
        {
            return Err(self.membership_change(format!(
                "change {} (membership {:016x}) is superseded by change {} (membership {:016x})",
                sealed.epoch, sealed.stamp, current.epoch, current.stamp
            )));
        }
        // The same change again (its coordinator retrying, or another of
        // the same membership): as it stands, open or not.
        if sealed.epoch > current.epoch {
            self.submit(Change::KeyedRing(sealed)).await?;
        }
        // Shared from here: own reads and un-keyed writes go on during the
        // walk; what adds records besides a keyed apply (an adoption, a
        // reconciliation) is refused while sealed, and a restore cannot
        // come (none is awaited).
        let _walking = paused.downgrade();
        let store = self.state.store.clone();
        // A walk over every record: off the async workers.
        let handed_on = tokio::task::spawn_blocking(move || {
            store.records_where(|counter, key| Some(ring.key_owner(counter, key, stripes)) != this)
        })
        .await
        .map_err(Refusal::from)?;
        // Handed on only once the log holds them: a record lost with a
        // crash here would have been handed on for an increment that is
        // not counted anywhere.
        self.durable(self.state.store.open_epoch()).await?;
        tracing::info!(
            node_id = &*self.node_id,
            ring = format_args!("{:016x}", sealed.stamp),
            epoch = sealed.epoch,
            records = handed_on.len(),
            "keyed increments sealed for a membership change"
        );
        Ok(pb::RealignResponse {
            records: records_to_wire(handed_on),
        })
    }

    /// Step 2: adds the records handed on for this node's keys, then takes
    /// keyed increments of the change's membership only. Only after a seal
    /// for that change (this node's own records are handed on first).
    /// Repeatable.
    async fn open(
        &self,
        change: KeyedRing,
        records: Vec<crate::replicas::CopyRecord>,
    ) -> Result<(), Refusal> {
        crate::crash_point::reached(crate::crash_point::REALIGN_OPEN);
        let open = KeyedRing {
            sealed: false,
            ..change
        };
        // Alone: no seal of another change slips in between.
        let _paused = self.own_writes.write().await;
        let current = self.state.meta.lock().keyed_ring;
        if (current.epoch, current.stamp) != (change.epoch, change.stamp) {
            return Err(self.membership_change(format!(
                "it is not sealed for change {} (membership {:016x}) but at change {} \
                 (membership {:016x})",
                change.epoch, change.stamp, current.epoch, current.stamp
            )));
        }
        let count = records.len();
        if count > 0 {
            // A record this node has for the same key wins (it applied the
            // key itself; the same delta, or a conflict either way).
            self.submit(Change::SetOwn {
                why: OwnChange::HandedOn,
                entries: Vec::new(),
                records,
            })
            .await?;
        }
        if current != open {
            self.submit(Change::KeyedRing(open)).await?;
            tracing::info!(
                node_id = &*self.node_id,
                ring = format_args!("{:016x}", change.stamp),
                epoch = change.epoch,
                records = count,
                "keyed increments open to a new membership"
            );
        }
        Ok(())
    }

    /// After a restore: a node that knows no membership (its directory is
    /// new) opens its keyed increments to `stamp` at change `epoch` (0:
    /// stays as it is): the copy restored was taken while it was open to
    /// that change, so it holds the records handed on to it, and every
    /// other node was open to it as the sender saw them just before. A node
    /// sealed since by a change under way waits for that change to open it;
    /// otherwise the next change does (it joins `epoch`, and every node
    /// hands the records on again).
    pub(super) async fn open_after_restore(&self, stamp: u64, epoch: u64) -> Result<(), Refusal> {
        if stamp == 0 || epoch == 0 {
            return Ok(());
        }
        let _paused = self.own_writes.write().await;
        if self.state.meta.lock().keyed_ring != KeyedRing::default() {
            return Ok(());
        }
        self.submit(Change::KeyedRing(KeyedRing {
            stamp,
            sealed: false,
            epoch,
        }))
        .await
    }

    /// Called before own records are added outside the increment path
    /// (an adoption, a reconciliation), with `own_writes` held alone: if
    /// sealed, the change under way may have walked the records already and
    /// would not hand these on. Its seal is superseded (the same
    /// membership, the next number): its open is refused here, and its
    /// coordinator seals every node again, walking these too. Refusing the
    /// records instead could leave a takeover that can never be reconciled
    /// and a change that can never begin, each waiting for the other.
    pub(super) async fn supersede_seal(&self) -> Result<(), Refusal> {
        let current = self.state.meta.lock().keyed_ring;
        if current.sealed {
            self.submit(Change::KeyedRing(KeyedRing {
                epoch: current.epoch + 1,
                ..current
            }))
            .await?;
        }
        Ok(())
    }
}

/// The ring a seal names, checked against its stamp: a node hands on
/// records only by the membership the sender meant.
fn ring_of(membership: &pb::RingSpec, stamp: u64) -> Result<Ring, Refusal> {
    if membership.stripes == 0 {
        return Err(Refusal::InvalidRequest(
            "a membership with 0 stripes".into(),
        ));
    }
    let nodes: Vec<NodeSpec> = membership
        .members
        .iter()
        .map(|member| NodeSpec {
            id: member.id.clone(),
            weight: member.weight,
        })
        .collect();
    let ring = Ring::new(&nodes, membership.vnodes_per_weight)
        .map_err(|error| Refusal::InvalidRequest(format!("a membership change: {error}")))?;
    let made = ring.keyed_stamp(membership.stripes);
    if made != stamp {
        return Err(Refusal::InvalidRequest(format!(
            "the membership sent makes ring {made:016x}, not {stamp:016x}"
        )));
    }
    Ok(ring)
}
