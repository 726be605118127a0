//! Reads of the node's own entries and copies, and its status report.

use std::sync::atomic::{AtomicU64, Ordering};

use tally_proto::pb;

use super::ShardService;
use crate::refusal::Refusal;

impl ShardService {
    /// Own entries of each counter asked and every copy's, in one view,
    /// with the drain and restore state a coordinator's merge needs.
    pub(super) async fn read_counters(
        &self,
        request: pb::ReadRequest,
    ) -> Result<pb::ReadResponse, Refusal> {
        self.check_node_id(&request.node_id)?;
        // Own entries and copies as one view: an adoption is seen whole.
        let _reading = self.own_writes.read().await;
        // Before the entries, under the same pause a reconciliation takes:
        // an answer below a reconciliation's version was read before it.
        let version = self.state.store.replication_version();
        let (restoring, handed_to, retired, directory_id, standing_in_for, takeovers_ended) = {
            let meta = self.state.meta.lock();
            (
                meta.awaiting_restore,
                meta.drain
                    .handed_to()
                    .map(|(adopter, version)| (adopter.to_string(), version)),
                meta.retired.keys().cloned().collect::<Vec<_>>(),
                meta.directory_id,
                meta.standing_in_for.keys().cloned().collect::<Vec<_>>(),
                meta.copies_dated_from
                    .iter()
                    .map(|(origin, &version)| pb::TakeoverEnded {
                        origin: origin.clone(),
                        version,
                        directory_id: meta
                            .reconciled_directories
                            .get(origin)
                            .copied()
                            .unwrap_or_default(),
                    })
                    .collect::<Vec<_>>(),
            )
        };
        let (drained_to, handed_over_version) = handed_to.unwrap_or_default();
        let counters = request
            .counters
            .iter()
            .filter(|_| drained_to.is_empty())
            .map(|counter| pb::CounterEntries {
                entries: self
                    .state
                    .store
                    .read(counter)
                    .into_iter()
                    .map(|(stripe, value)| pb::StripeValue { stripe, value })
                    .collect(),
            })
            .collect();
        let replicas = self
            .state
            .replicas
            .read(&request.counters)
            .into_iter()
            .map(|copy| pb::ReplicaPart {
                age_ms: self.copy_ages.age_ms(&copy.origin),
                origin: copy.origin,
                version: copy.stamp.version,
                scanned_unix_ms: copy.stamp.scanned_unix_ms,
                directory_id: copy.stamp.directory_id,
                counters: copy
                    .counters
                    .into_iter()
                    .map(|entries| pb::CounterEntries {
                        entries: entries
                            .into_iter()
                            .map(|(stripe, value)| pb::StripeValue { stripe, value })
                            .collect(),
                    })
                    .collect(),
            })
            .collect();
        // After the entries, by the clock the sweep reclaims by: a read
        // that saw any part of a window gone reads a clock past its end,
        // grace and margin, so a window answered as current was answered
        // whole (`crate::windows`).
        let windows = self.state.store.windows();
        let now_unix_ms = windows.now_ms();
        let mut expired = Vec::new();
        if let Some(first) = request
            .counters
            .iter()
            .position(|counter| windows.ended(counter, now_unix_ms).is_some())
        {
            expired = vec![false; request.counters.len()];
            expired[first] = true;
            for (flag, counter) in expired.iter_mut().zip(&request.counters).skip(first + 1) {
                *flag = windows.ended(counter, now_unix_ms).is_some();
            }
        }
        Ok(pb::ReadResponse {
            expired,
            now_unix_ms,
            counters,
            replicas,
            restoring,
            drained_to,
            directory_id,
            handed_over_version,
            retired,
            standing_in_for,
            version,
            takeovers_ended,
        })
    }

    /// The node's identity, counts, log and checkpoint state, drain and
    /// copies; `brief` skips what walks every entry.
    pub(super) async fn status_report(
        &self,
        request: pb::ShardStatusRequest,
    ) -> Result<pb::ShardStatusResponse, Refusal> {
        let brief = request.brief;
        let meta = self.state.meta.lock().clone();
        let stats = self.journal.stats();
        let load = |value: &AtomicU64| value.load(Ordering::Relaxed);
        Ok(pb::ShardStatusResponse {
            standing_in_for: meta.standing_in_for.keys().cloned().collect(),
            keyed_ring: meta.keyed_ring.stamp,
            keyed_ring_sealed: meta.keyed_ring.sealed,
            keyed_ring_epoch: meta.keyed_ring.epoch,
            metrics_address: self.metrics_address.to_string(),
            node_id: self.node_id.to_string(),
            // A walk over every entry: not for frequent probes.
            entries: if brief {
                0
            } else {
                self.state.store.entry_count()
            },
            replica_entries: if brief {
                0
            } else {
                self.state.replicas.entry_count()
            },
            protocol_version: tally_proto::SHARD_PROTOCOL_VERSION,
            table_bytes: if brief {
                0
            } else {
                self.state.store.table_bytes() + self.state.replicas.table_bytes()
            },
            last_flush_unix_ms: load(&stats.last_flush_unix_ms) as i64,
            durability_mode: pb::Durability::from(self.durability) as i32,
            apply_calls: self.apply_calls.load(Ordering::Relaxed),
            increments_applied: self.increments_applied.load(Ordering::Relaxed),
            full_copies_received: self.full_copies_received.load(Ordering::Relaxed),
            remembered_keys: self.state.store.remembered_keys(),
            keys_forgotten_early: self.state.store.keys_forgotten_early(),
            flush_sequence: load(&stats.last_seq),
            log_bytes: load(&stats.log_bytes),
            log_segments: load(&stats.log_segments),
            log_commits: load(&stats.commits),
            checkpoint_position: load(&stats.checkpoint_position),
            last_checkpoint_unix_ms: load(&stats.last_checkpoint_unix_ms) as i64,
            checkpoints: load(&stats.checkpoints),
            checkpoint_failures: load(&stats.checkpoint_failures),
            replicas: self
                .state
                .replicas
                .versions()
                .into_iter()
                .map(|(origin, version)| pb::ReplicaPart {
                    age_ms: self.copy_ages.age_ms(&origin),
                    origin,
                    version,
                    ..Default::default()
                })
                .collect(),
            restoring: meta.awaiting_restore,
            replication_version: self.state.store.replication_version(),
            drain_state: meta.drain.stage() as i32,
            drain_adopter: meta.drain.adopter().unwrap_or_default().to_string(),
            drain_version: meta.drain.handed_to().map_or(0, |(_, version)| version),
        })
    }
}

impl ShardService {
    /// Sets `metrics` from the node's state: what a scrape reads.
    pub(crate) fn publish_metrics(&self, metrics: &crate::metrics::ShardMetrics) {
        let stats = self.journal.stats();
        let load = |value: &AtomicU64| value.load(Ordering::Relaxed);
        metrics.apply_calls.absolute(load(&self.apply_calls));
        metrics
            .increments_applied
            .absolute(load(&self.increments_applied));
        metrics.log_commits.absolute(load(&stats.commits));
        metrics.log_bytes.set(load(&stats.log_bytes) as f64);
        metrics.log_segments.set(load(&stats.log_segments) as f64);
        metrics.checkpoints.absolute(load(&stats.checkpoints));
        metrics
            .checkpoint_failures
            .absolute(load(&stats.checkpoint_failures));
        metrics
            .windows_reclaimed
            .absolute(load(&stats.windows_reclaimed));
        let last_checkpoint = load(&stats.last_checkpoint_unix_ms);
        if last_checkpoint > 0 {
            let age_ms = crate::journal::unix_ms_now().saturating_sub(last_checkpoint);
            metrics.checkpoint_age.set(age_ms as f64 / 1_000.0);
        }
        metrics.entries.set(self.state.store.entry_count() as f64);
        metrics
            .remembered_keys
            .set(self.state.store.remembered_keys() as f64);
        metrics
            .keys_forgotten_early
            .absolute(self.state.store.keys_forgotten_early());
        let copies = self.state.replicas.versions();
        metrics.replica_copies.set(copies.len() as f64);
        metrics
            .replica_entries
            .set(self.state.replicas.entry_count() as f64);
        metrics.set_copy_ages(
            copies
                .into_iter()
                .map(|(origin, _)| {
                    let age = self.copy_ages.age_ms(&origin);
                    (origin, age)
                })
                .collect(),
        );
    }
}
