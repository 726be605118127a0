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

use tally_proto::pb;
use tally_ring::{NodeSpec, Ring};

use super::{records, records_to_wire, ShardService};
use crate::change::{Change, OwnChange};
use crate::meta::KeyedRing;
use crate::refusal::Refusal;

impl ShardService {
    pub(super) async fn realign_to_the_end(
        &self,
        request: pb::RealignRequest,
    ) -> Result<pb::RealignResponse, Refusal> {
        self.check_node_id(&request.node_id)?;
        if request.ring == 0 {
            return Err(Refusal::InvalidRequest(
                "a membership change names no membership (ring 0)".into(),
            ));
        }
        match (request.seal, request.open) {
            (Some(membership), false) => self.seal(request.ring, membership).await,
            (None, true) => {
                let records = records(request.records)?;
                self.open(request.ring, records).await?;
                Ok(pb::RealignResponse::default())
            }
            _ => Err(Refusal::InvalidRequest(
                "a membership change either seals or opens".into(),
            )),
        }
    }

    /// Step 1: takes no more keyed increments, and hands on the records of
    /// keys another node owns in `membership`. Repeatable.
    async fn seal(
        &self,
        stamp: u64,
        membership: pb::RingSpec,
    ) -> Result<pb::RealignResponse, Refusal> {
        let ring = ring_of(&membership, stamp)?;
        let this = ring.node_index(&self.node_id);
        let stripes = membership.stripes;
        let sealed = KeyedRing {
            stamp,
            sealed: true,
        };
        // Alone, to seal: no keyed apply is half done, and none begins on
        // the old membership after (each checks under the shared lock).
        let paused = self.own_writes.write().await;
        {
            let meta = self.state.meta.lock();
            if let Some(origin) = meta.standing_in_for.keys().next() {
                return Err(Refusal::TakeoverOpen {
                    node: self.node_id.to_string(),
                    origin: origin.clone(),
                });
            }
        }
        if self.state.meta.lock().keyed_ring != sealed {
            self.submit(Change::KeyedRing(sealed)).await?;
        }
        // Shared from here: own reads and un-keyed writes go on during the
        // walk; what adds records besides a keyed apply (a restore, an
        // adoption, a reconciliation) waits for it.
        let _walking = paused.downgrade();
        let handed_on = self
            .state
            .store
            .records_where(|counter, key| Some(ring.key_owner(counter, key, stripes)) != this);
        // Handed on only once the log holds them: a record lost with a
        // crash here would have been handed on for an increment that is
        // not counted anywhere.
        self.durable(self.state.store.open_epoch()).await?;
        tracing::info!(
            node_id = &*self.node_id,
            ring = format_args!("{stamp:016x}"),
            records = handed_on.len(),
            "keyed increments sealed for a membership change"
        );
        Ok(pb::RealignResponse {
            records: records_to_wire(handed_on),
        })
    }

    /// Step 2: adds the records handed on for this node's keys, then takes
    /// keyed increments of membership `stamp` only. Only after a seal for
    /// it (this node's own records are handed on first). Repeatable.
    async fn open(
        &self,
        stamp: u64,
        records: Vec<crate::replicas::CopyRecord>,
    ) -> Result<(), Refusal> {
        let open = KeyedRing {
            stamp,
            sealed: false,
        };
        // Alone: no seal for another membership slips in between.
        let _paused = self.own_writes.write().await;
        let current = self.state.meta.lock().keyed_ring;
        if current.stamp != stamp {
            return Err(Refusal::InvalidRequest(format!(
                "node {} is not sealed for membership {stamp:016x} (it is at {:016x}): seal it \
                 first",
                self.node_id, current.stamp
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
        }
        tracing::info!(
            node_id = &*self.node_id,
            ring = format_args!("{stamp:016x}"),
            records = count,
            "keyed increments open to a new membership"
        );
        Ok(())
    }
}

impl ShardService {
    /// After a restore: a node that knows no membership (a new directory)
    /// opens its keyed increments to `stamp` (0: stays as it is), the
    /// membership every node was open to when the sender last moved them,
    /// none being moved now: it held it before its directory was lost, and
    /// its records are back. A node sealed since by a change under way
    /// waits for that change to open it.
    pub(super) async fn open_after_restore(&self, stamp: u64) -> Result<(), Refusal> {
        let _paused = self.own_writes.write().await;
        if stamp == 0 || self.state.meta.lock().keyed_ring.stamp != 0 {
            return Ok(());
        }
        self.submit(Change::KeyedRing(KeyedRing {
            stamp,
            sealed: false,
        }))
        .await
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
