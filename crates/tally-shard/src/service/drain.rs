//! The node's part in a drain: stopping writes, the hand-over, adopting a
//! drained node's entries, dropping copies of it.

use tally_proto::pb;

use super::ShardService;
use crate::change::{Change, OwnChange};
use crate::meta::{DrainState, DrainStep};
use crate::refusal::Refusal;

impl ShardService {
    pub(super) async fn drain_to_the_end(
        &self,
        request: pb::ShardDrainRequest,
    ) -> Result<pb::ShardDrainResponse, Refusal> {
        self.check_node_id(&request.node_id)?;
        let asked = match pb::DrainPhase::try_from(request.phase) {
            Ok(pb::DrainPhase::StopWrites) => DrainState::Draining,
            Ok(pb::DrainPhase::HandedOver) => DrainState::HandedOver {
                adopter: request.adopter.clone(),
                version: request.version,
            },
            Ok(pb::DrainPhase::Adopted) => DrainState::Drained {
                adopter: request.adopter.clone(),
                version: request.version,
            },
            _ => return Err(Refusal::InvalidRequest("unknown drain phase".into())),
        };
        // Alone: no write is half-way past the check while the state moves.
        let paused = self.own_writes.write().await;
        let current = self.state.meta.lock().drain.clone();
        let step = current
            .step_to(&asked)
            .map_err(|why| Refusal::DrainConflict(format!("node {} is {why}", self.node_id)))?;
        if step == DrainStep::Advance {
            self.submit(Change::Drain(asked.clone())).await?;
            tracing::info!(
                node_id = &*self.node_id,
                state = asked.stage().public_name(),
                "drain"
            );
        }
        // Everything written before the stop is in the log before the
        // caller takes the final copy: the epoch now covers it, and no write
        // comes after, so the wait needs no lock.
        let epoch = self.state.store.open_epoch();
        drop(paused);
        self.flushed(epoch).await?;
        Ok(pb::ShardDrainResponse {})
    }

    pub(super) async fn adopt_to_the_end(
        &self,
        request: pb::AdoptRequest,
    ) -> Result<pb::AdoptResponse, Refusal> {
        self.check_node_id(&request.node_id)?;
        let _replica_writes = self.replica_writes.lock().await;
        if self.is_retired(&request.origin) {
            return Ok(pb::AdoptResponse { entries: 0 });
        }
        if self.state.meta.lock().drain != DrainState::Serving {
            return Err(Refusal::DrainConflict(format!(
                "node {} is being drained itself: it cannot adopt {}",
                self.node_id, request.origin
            )));
        }
        let Some((stamp, entries, records)) = self.state.replicas.copy_of(&request.origin) else {
            return Err(Refusal::CopyMissing(format!(
                "node {} holds no copy of {}",
                self.node_id, request.origin
            )));
        };
        let version = stamp.version;
        if version < request.version {
            return Err(Refusal::CopyMissing(format!(
                "the copy of {} is at version {version}, not yet {}",
                request.origin, request.version
            )));
        }
        let count = self
            .add_to_own(
                entries,
                records,
                OwnChange::Adopted {
                    origin: request.origin.clone(),
                    version,
                },
            )
            .await?;
        tracing::info!(
            node_id = &*self.node_id,
            origin = request.origin,
            entries = count,
            "adopted a drained node's entries"
        );
        Ok(pb::AdoptResponse {
            entries: count as u64,
        })
    }

    pub(super) async fn drop_copy_to_the_end(
        &self,
        request: pb::DropCopyRequest,
    ) -> Result<pb::DropCopyResponse, Refusal> {
        self.check_node_id(&request.node_id)?;
        tally_proto::domain::validate_node_id(&request.origin).map_err(Refusal::InvalidRequest)?;
        let _replica_writes = self.replica_writes.lock().await;
        if self.is_retired(&request.origin) {
            return Ok(pb::DropCopyResponse {});
        }
        self.submit(Change::DropCopy {
            origin: request.origin,
        })
        .await?;
        Ok(pb::DropCopyResponse {})
    }
}
