//! Copies: this node's changes for its replicas, the copies it keeps of
//! other nodes, and the restore of a node that started empty.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tally_proto::pb;

use super::{entries, records, records_to_wire, ShardService};
use crate::change::{Change, OwnChange};
use crate::journal::unix_ms_now;
use crate::meta::KeyedRing;
use crate::refusal::Refusal;
use crate::replicas::{CopyStamp, Verdict};

impl ShardService {
    /// Own entries changed since a version (or all): what a coordinator
    /// copies to this node's replicas. Refused while awaiting a restore or
    /// once drained.
    pub(super) async fn changes_since(
        &self,
        request: pb::ChangesRequest,
    ) -> Result<pb::ChangesResponse, Refusal> {
        self.check_node_id(&request.node_id)?;
        // An empty node's "everything" would replace its good copies.
        self.check_restored()?;
        // Held across the scan: a hand-over cannot slip in between the
        // check and the version this scan takes.
        let reading = self.own_writes.read().await;
        // The keyed membership under the same lock as the scan: an open
        // adds its handed-on records under the lock alone, so a copy that
        // says "open" holds them.
        let (drained, directory_id, recorded, keyed_ring) = {
            let meta = self.state.meta.lock();
            (
                meta.drain.adopter().is_some(),
                meta.directory_id,
                meta.incarnation,
                meta.keyed_ring,
            )
        };
        if recorded != self.state.store.incarnation() {
            // Versions of an unrecorded start could be handed out again by
            // the next one.
            return Err(self
                .storage_failed("this start is not recorded in the log yet (is its disk full?)"));
        }
        if drained {
            return Err(Refusal::Drained(self.node_id.to_string()));
        }
        // Taken before the scan: the copy will hold everything acknowledged
        // before this time.
        let scanned_unix_ms = unix_ms_now();
        let store = self.state.store.clone();
        let since = request.since;
        // A walk over every entry: off the async workers.
        let changes = tokio::task::spawn_blocking(move || store.changes_since(since))
            .await
            .map_err(Refusal::from)?;
        // The scan read memory, where a change is made before the log holds
        // it: answered only once the log holds everything scanned (by the
        // node's durability mode). A copy must never be ahead of the log: a
        // stand-in finding a key in it answers the key's retry as a
        // duplicate, and the node could still lose it in a crash.
        let scanned_epoch = self.state.store.open_epoch();
        drop(reading);
        self.durable(scanned_epoch).await?;
        Ok(pb::ChangesResponse {
            scanned_unix_ms,
            directory_id,
            version: changes.version,
            full: changes.full,
            entries: changes
                .entries
                .into_iter()
                .map(|(counter, stripe, value)| pb::EntryValue {
                    counter: counter.into_string(),
                    stripe,
                    value,
                })
                .collect(),
            records: records_to_wire(changes.records),
            keyed_ring: keyed_ring.stamp,
            keyed_ring_epoch: keyed_ring.epoch,
            keyed_ring_sealed: keyed_ring.sealed,
        })
    }

    /// The whole copy this node holds of `origin`'s entries, if any.
    pub(super) async fn copy_of_origin(
        &self,
        request: pb::CopyOfRequest,
    ) -> Result<pb::CopyOfResponse, Refusal> {
        self.check_node_id(&request.node_id)?;
        let keyed = self.copy_ages.keyed_ring_of(&request.origin);
        let response = match self.state.replicas.copy_of(&request.origin) {
            Some((stamp, entries, copied_records)) => pb::CopyOfResponse {
                keyed_ring: keyed.map_or(0, |keyed| keyed.stamp),
                keyed_ring_epoch: keyed.map_or(0, |keyed| keyed.epoch),
                keyed_ring_sealed: keyed.is_some_and(|keyed| keyed.sealed),
                records: records_to_wire(copied_records),
                found: true,
                version: stamp.version,
                scanned_unix_ms: stamp.scanned_unix_ms,
                entries: entries
                    .into_iter()
                    .map(|(counter, stripe, value)| pb::EntryValue {
                        counter,
                        stripe,
                        value,
                    })
                    .collect(),
            },
            None => pb::CopyOfResponse::default(),
        };
        Ok(response)
    }

    pub(super) async fn replicate_to_the_end(
        &self,
        request: pb::ReplicateRequest,
    ) -> Result<pb::ReplicateResponse, Refusal> {
        self.check_node_id(&request.node_id)?;
        if request.origin == *self.node_id {
            return Err(Refusal::InvalidRequest(
                "a node does not hold a replica copy of itself".into(),
            ));
        }
        tally_proto::domain::validate_node_id(&request.origin).map_err(Refusal::InvalidRequest)?;
        // When the round began, on this node's clock: the copy will hold
        // everything the origin acknowledged before then. (Later by the
        // request's transit, which the sender cannot measure: on a local
        // network milliseconds, for a full copy of millions of entries up to
        // a few hundred.) None if this clock cannot go back that far: the
        // copy's age then stays unknown, never too young.
        let round_began =
            Instant::now().checked_sub(Duration::from_millis(request.round_elapsed_ms));
        let stamp = CopyStamp {
            version: request.version,
            scanned_unix_ms: request.scanned_unix_ms,
            directory_id: request.directory_id,
        };
        let keyed = keyed_ring_of(&request);
        let entries = entries(request.entries)?;
        let records = records(request.records)?;
        let _replica_writes = self.replica_writes.lock().await;
        if self
            .state
            .meta
            .lock()
            .standing_in_for
            .contains_key(&request.origin)
        {
            // Frozen until the origin has reconciled.
            return Err(Refusal::StandingIn {
                node: self.node_id.to_string(),
                origin: request.origin,
            });
        }
        if self.is_retired(&request.origin) {
            // Drained: a late push must not bring its copy back.
            return Ok(pb::ReplicateResponse {
                accepted: true,
                version: request.version,
            });
        }
        match self
            .state
            .replicas
            .accepts(&request.origin, request.base, &stamp, request.full)
        {
            Verdict::Apply => {}
            Verdict::Stale => {
                // Already at or past this version: as fresh as this round.
                let version = self.state.replicas.version(&request.origin);
                if let Some(round_began) =
                    round_began.filter(|_| self.dates(&request.origin, version))
                {
                    self.copy_ages.refresh(&request.origin, round_began, keyed);
                }
                return Ok(pb::ReplicateResponse {
                    accepted: true,
                    version,
                });
            }
            Verdict::NeedFull => {
                return Ok(pb::ReplicateResponse {
                    accepted: false,
                    version: self.state.replicas.version(&request.origin),
                })
            }
        }
        // Counted before the copy becomes visible, so a status that shows
        // the copy also counts it (the journal makes it visible before
        // `submit` returns).
        if request.full {
            self.full_copies_received.fetch_add(1, Ordering::Relaxed);
        }
        // In the log first, then visible to reads.
        let origin = request.origin;
        self.submit(Change::Replica {
            origin: origin.clone(),
            stamp,
            full: request.full,
            entries,
            records,
        })
        .await?;
        if let Some(round_began) = round_began.filter(|_| self.dates(&origin, request.version)) {
            self.copy_ages.refresh(&origin, round_began, keyed);
        }
        Ok(pb::ReplicateResponse {
            accepted: true,
            version: request.version,
        })
    }

    pub(super) async fn restore_to_the_end(
        &self,
        request: pb::RestoreRequest,
    ) -> Result<pb::RestoreResponse, Refusal> {
        self.check_node_id(&request.node_id)?;
        let entries = entries(request.entries)?;
        let records = records(request.records)?;
        let _replica_writes = self.replica_writes.lock().await;
        if !self.restoring() {
            return Err(Refusal::NotAwaitingRestore(self.node_id.to_string()));
        }
        let count = self
            .add_to_own(entries, records, OwnChange::Restored)
            .await?;
        self.open_after_restore(request.ring, request.ring_epoch)
            .await?;
        if count == 0 {
            tracing::info!(
                node_id = &*self.node_id,
                "started empty; no copies to restore"
            );
        } else {
            tracing::info!(
                node_id = &*self.node_id,
                entries = count,
                "restored from replicas"
            );
        }
        Ok(pb::RestoreResponse {})
    }
}

impl ShardService {
    /// Whether a round that brought `origin`'s copy to `version` dates it:
    /// not below the version of `origin`'s last reconciliation with this
    /// node (a round scanned before it, pushed late, still counts what the
    /// reconciliation took out).
    fn dates(&self, origin: &str, version: u64) -> bool {
        self.state
            .meta
            .lock()
            .copies_dated_from
            .get(origin)
            .is_none_or(|&from| version >= from)
    }
}

/// When each copy this node holds was last brought up to date: the moment,
/// on this node's monotonic clock, the replication round that reached it
/// began. In memory only (a restart forgets it: a copy's age is then
/// unknown until the next round, and it does not stand in for its origin
/// meanwhile). Reads report it as an age, a duration on one clock, so no
/// decision compares clock readings across nodes.
#[derive(Debug, Default)]
pub(super) struct CopyAges {
    /// Per origin: when the last round that reached its copy began, and the
    /// keyed membership the origin followed at that round's scan.
    refreshed: parking_lot::Mutex<HashMap<String, (Instant, KeyedRing)>>,
}

/// The origin's keyed membership a Replicate carries.
fn keyed_ring_of(request: &pb::ReplicateRequest) -> KeyedRing {
    KeyedRing {
        stamp: request.keyed_ring,
        sealed: request.keyed_ring_sealed,
        epoch: request.keyed_ring_epoch,
    }
}

impl CopyAges {
    /// A round that began at `began` reached `origin`'s copy, which
    /// followed `keyed` then. Only moves forward: rounds of several
    /// coordinators may arrive out of order.
    pub(super) fn refresh(&self, origin: &str, began: Instant, keyed: KeyedRing) {
        let mut refreshed = self.refreshed.lock();
        match refreshed.get_mut(origin) {
            Some(at) if at.0 >= began => {}
            Some(at) => *at = (began, keyed),
            None => {
                refreshed.insert(origin.to_string(), (began, keyed));
            }
        }
    }

    /// The keyed membership `origin` followed as of its copy here, if a
    /// round reached the copy since this node started (or since a takeover
    /// of it ended).
    pub(super) fn keyed_ring_of(&self, origin: &str) -> Option<KeyedRing> {
        self.refreshed.lock().get(origin).map(|at| at.1)
    }

    /// `origin`'s copy is of unknown age until a round reaches it again
    /// (one at or above the version its takeover's end recorded): a
    /// takeover froze it.
    pub(super) fn forget(&self, origin: &str) {
        self.refreshed.lock().remove(origin);
    }

    /// How long ago `origin`'s copy was last brought up to date, in ms.
    pub(super) fn age_ms(&self, origin: &str) -> Option<u64> {
        self.refreshed
            .lock()
            .get(origin)
            .map(|at| at.0.elapsed().as_millis() as u64)
    }
}
