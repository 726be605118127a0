//! What the coordinator does with a request once it is valid: route
//! increments over the ring, fan reads and deletes out to every node.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use futures::future::join_all;
use tally_proto::domain::{CounterName, IdempotencyKey, Increment};
use tally_proto::pb;
use tally_proto::shard_error::Reason;
use tally_ring::Ring;
use tokio::time::Instant;

use crate::config::CoordinatorConfig;
use crate::deadline::call_budget;
use crate::error::{CoordinatorError, Result, ShardCallError};
use crate::health::{probe_loop, HealthBoard, NodeHealth};
use crate::merge::{self, NodeView};
use crate::model::{Outcome, StripeIncrement};
use crate::placement::{write_target, WriteState};
use crate::shard_client::{BatchSettings, ShardClient};

thread_local! {
    /// Next stripe for increments without an idempotency key. Per thread, so
    /// spreading load does not itself contend on one shared counter.
    static NEXT_STRIPE: Cell<u32> = Cell::new(xxhash_rust::xxh3::xxh3_64(
        format!("{:?}", std::thread::current().id()).as_bytes(),
    ) as u32);
}

/// The membership, its ring, and a client per node.
#[derive(Debug)]
pub struct Cluster {
    config: CoordinatorConfig,
    ring: Ring,
    /// Indexed like `ring.nodes()`.
    shards: Vec<ShardClient>,
    /// Indexed like `ring.nodes()`.
    health: Arc<HealthBoard>,
    /// Each node's replicas (by index): fixed by the ring and the
    /// replication factor.
    replicas: Vec<Vec<usize>>,
}

/// Where a replication round left one (origin, replica) pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Copied {
    /// The replica's copy is at this version of the origin.
    At(u64),
    /// The next round must send the whole copy.
    NeedsFull,
    /// Nothing was sent (a node is down): as before.
    Unchanged,
}

/// One counter's total as a read found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Total {
    /// The counter.
    pub counter: String,
    /// Sum of the parts that were read.
    pub value: i64,
    /// Every node's part was read.
    pub complete: bool,
}

impl Cluster {
    /// Builds the ring and a lazily connecting client per node, and starts
    /// probing every node's health. Needs a tokio runtime.
    pub fn new(config: CoordinatorConfig) -> std::result::Result<Arc<Self>, crate::StartError> {
        Self::build(config, None)
    }

    /// [`Cluster::new`] for a reloaded membership: nodes that keep their id
    /// and address keep their client (connection, batcher, queued work) and
    /// their health.
    fn build(
        config: CoordinatorConfig,
        previous: Option<&Cluster>,
    ) -> std::result::Result<Arc<Self>, crate::StartError> {
        let ring = config.ring()?;
        let settings = BatchSettings {
            shard_timeout: config.shard_timeout,
            max_in_flight_batches: config.max_in_flight_batches_per_shard,
            max_increments_per_batch: config.max_increments_per_shard_batch,
        };
        let shards = ring
            .nodes()
            .iter()
            .map(|node| {
                let address = &config
                    .node(&node.id)
                    .expect("the ring is built from the config's nodes")
                    .address;
                let kept = previous.and_then(|previous| {
                    previous
                        .shards
                        .iter()
                        .find(|shard| shard.node_id() == node.id && shard.address() == address)
                });
                match kept {
                    Some(shard) => Ok(shard.clone()),
                    None => ShardClient::new(&node.id, address, settings),
                }
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let health = Arc::new(HealthBoard::new(
            ring.nodes().iter().map(|node| Arc::from(node.id.as_str())),
        ));
        if let Some(previous) = previous {
            for (index, shard) in shards.iter().enumerate() {
                let known = previous.shards.iter().position(|old| {
                    old.node_id() == shard.node_id() && old.address() == shard.address()
                });
                if let Some(old_index) = known {
                    health.restore(index, previous.health.get(old_index));
                }
            }
        }
        for (index, shard) in shards.iter().enumerate() {
            tokio::spawn(probe_loop(
                Arc::downgrade(&health),
                index,
                shard.clone(),
                config.health_interval,
                config.health_timeout,
            ));
        }
        let replication_interval = config.replication_interval;
        let replicas = (0..shards.len())
            .map(|node| crate::replication::replicas_of(&ring, node, config.replication_factor))
            .collect();
        let cluster = Arc::new(Cluster {
            config,
            ring,
            shards,
            health,
            replicas,
        });
        // Also without replicas: it restores nodes that started empty.
        tokio::spawn(crate::replication::replication_loop(
            Arc::downgrade(&cluster),
            replication_interval,
        ));
        Ok(cluster)
    }

    /// What the read merge needs to know of each node now
    /// ([`merge::NodeView`]).
    fn node_views(&self) -> Vec<NodeView<'_>> {
        let now = crate::health::unix_ms_now();
        // Detection lags a failure by up to a probe: a copy may stand in
        // for a node if it is at most one replication and one detection
        // interval older than the failure (as far as clocks tell: the
        // origin stamps the scan time, this coordinator the failure).
        let allowance = (self.config.replication_interval
            + self.config.health_interval
            + self.config.health_timeout)
            .as_millis() as i64;
        self.shards
            .iter()
            .enumerate()
            .map(|(node, shard)| {
                let health = self.health.get(node);
                let failed_unix_ms = if health.up || health.since_unix_ms == 0 {
                    now
                } else {
                    health.since_unix_ms
                };
                NodeView {
                    id: shard.node_id(),
                    replicas: &self.replicas[node],
                    handed_over: health.drain.handed_over(),
                    oldest_usable_copy_unix_ms: failed_unix_ms - allowance,
                }
            })
            .collect()
    }

    /// Drains node `node_id`: moves its entries to the next node of the
    /// ring exactly once, so that it can leave the membership. Each step is
    /// safe to repeat, so a drain interrupted by a crash (of anything)
    /// resumes when asked again:
    ///
    /// 1. the node stops taking writes (and flushes);
    /// 2. its whole final state goes to the adopter's copy of it;
    /// 3. it records the hand-over: reads now count the adopter's copy;
    /// 4. the adopter adds the copy to its own entries and drops it, in one
    ///    atomic batch (reads see before or after, never both);
    /// 5. the node records that it is drained: a reload may now drop it.
    ///
    /// Returns the adopter and how many entries it took.
    pub async fn drain(&self, node_id: &str) -> Result<(String, u64)> {
        let node = self
            .shards
            .iter()
            .position(|shard| shard.node_id() == node_id)
            .ok_or_else(|| CoordinatorError::UnknownNode(node_id.to_string()))?;
        let budget = self.config.shard_timeout;
        let failed = |node: usize, error: ShardCallError| self.unavailable(node, error);
        let shard = &self.shards[node];
        // A node that started empty must get its earlier entries back
        // before it can hand them on.
        let status = shard
            .brief_status(budget)
            .await
            .map_err(|error| failed(node, error))?;
        if status.restoring {
            self.restore_node(node)
                .await
                .map_err(|error| failed(node, error))?;
        }
        // A drain that got as far as the hand-over resumes with the adopter
        // and version the node recorded, whatever the ring says now.
        let adopter_id = if status.drain_adopter.is_empty() {
            let successor = *crate::replication::replicas_of(&self.ring, node, 2)
                .first()
                .ok_or_else(|| {
                    CoordinatorError::Precondition("the last node cannot be drained".into())
                })?;
            self.shards[successor].node_id().to_string()
        } else {
            status.drain_adopter.clone()
        };
        let adopter = self
            .shards
            .iter()
            .position(|shard| shard.node_id() == adopter_id)
            .ok_or_else(|| {
                CoordinatorError::Precondition(format!(
                    "{node_id} was handed over to {adopter_id}, which is not in the membership"
                ))
            })?;
        let adopter_status = self.shards[adopter]
            .brief_status(budget)
            .await
            .map_err(|error| failed(adopter, error))?;
        if adopter_status.drain_state() != pb::DrainState::Serving {
            return Err(CoordinatorError::Precondition(format!(
                "{adopter_id}, which would take {node_id}'s entries, is being drained itself"
            )));
        }

        // 1. Route around it here at once. Writes already on their way to
        // it, from here or from coordinators that learn of the drain later
        // from their probes, come back unapplied (REDIRECT) and are routed
        // again: none fails.
        self.health.set_drain(node, pb::DrainState::Draining);
        shard
            .drain(pb::DrainPhase::StopWrites, "", 0, budget)
            .await
            .map_err(|error| failed(node, error))?;
        let status = shard
            .brief_status(budget)
            .await
            .map_err(|error| failed(node, error))?;
        let version = if status.drain_state() == pb::DrainState::Draining {
            // 2. Its whole final state to the adopter's copy.
            let changes = shard
                .changes(0, budget)
                .await
                .map_err(|error| failed(node, error))?;
            let version = changes.version;
            let answer = self.shards[adopter]
                .replicate(node_id, 0, changes, budget)
                .await
                .map_err(|error| failed(adopter, error))?;
            if !answer.accepted || answer.version < version {
                return Err(CoordinatorError::Precondition(format!(
                    "{adopter_id} did not take the final copy of {node_id}"
                )));
            }
            // 3. The hand-over: reads count the adopter's copy.
            shard
                .drain(pb::DrainPhase::HandedOver, &adopter_id, version, budget)
                .await
                .map_err(|error| failed(node, error))?;
            version
        } else {
            status.drain_version
        };
        self.health.set_drain(node, pb::DrainState::HandedOver);

        // 4. The adopter adds the copy to its own entries.
        let entries = self.shards[adopter]
            .adopt(node_id, version, budget)
            .await
            .map_err(|error| failed(adopter, error))?;
        // Before the node may leave, the adopter's replicas must hold what
        // it adopted: else a failure of the adopter now would lose it.
        self.wait_for_copies_of(adopter).await?;
        // Nobody else may count an old copy of it again.
        for (other, client) in self.shards.iter().enumerate() {
            if other != node && other != adopter {
                client
                    .drop_copy(node_id, budget)
                    .await
                    .map_err(|error| failed(other, error))?;
            }
        }
        // 5. Drained: a reload may drop it now.
        shard
            .drain(pb::DrainPhase::Adopted, &adopter_id, version, budget)
            .await
            .map_err(|error| failed(node, error))?;
        self.health.set_drain(node, pb::DrainState::Drained);
        tracing::info!(node_id, adopter = adopter_id, entries, "drained");
        Ok((adopter_id, entries))
    }

    /// A call to node `node` failed: UNAVAILABLE naming it.
    fn unavailable(&self, node: usize, error: ShardCallError) -> CoordinatorError {
        CoordinatorError::Unavailable(vec![(self.shards[node].node_id().to_string(), error)])
    }

    /// Waits until every replica of node `origin` holds a copy at the
    /// version `origin` has now (the replication loop brings it there
    /// within an interval). Bounded; an error says to resume later.
    async fn wait_for_copies_of(&self, origin: usize) -> Result<()> {
        let budget = self.config.shard_timeout;
        let origin_id = self.shards[origin].node_id();
        let failed = |node: usize, error: ShardCallError| self.unavailable(node, error);
        let target = self.shards[origin]
            .brief_status(budget)
            .await
            .map_err(|error| failed(origin, error))?
            .replication_version;
        let replicas = self.replicas[origin].clone();
        let limit = (self.config.replication_interval + budget) * 4;
        let started = tokio::time::Instant::now();
        for replica in replicas {
            loop {
                let status = self.shards[replica]
                    .brief_status(budget)
                    .await
                    .map_err(|error| failed(replica, error))?;
                let caught_up = status
                    .replicas
                    .iter()
                    .any(|copy| copy.origin == origin_id && copy.version >= target);
                if caught_up {
                    break;
                }
                if started.elapsed() > limit {
                    return Err(CoordinatorError::Precondition(format!(
                        "{origin_id}'s replicas have not caught up after adopting; run the \
                         drain again to finish it"
                    )));
                }
                tokio::time::sleep(self.config.replication_interval / 4).await;
            }
        }
        Ok(())
    }

    /// Nodes that said they await a restore and are up.
    pub fn restoring_nodes(&self) -> Vec<usize> {
        (0..self.shards.len())
            .filter(|&node| self.health.is_up(node) && self.health.is_restoring(node))
            .collect()
    }

    /// Adds to node `node`, which started with an empty data directory, its
    /// earlier entries: the freshest copy among its replicas. Every replica
    /// must answer (the freshest copy may be on the one that did not); with
    /// no copy anywhere (a new node) the restore is empty.
    pub async fn restore_node(&self, node: usize) -> std::result::Result<(), ShardCallError> {
        let budget = self.config.shard_timeout;
        let id = self.shards[node].node_id();
        let candidates = &self.replicas[node];
        let copies = join_all(
            candidates
                .iter()
                .map(|&candidate| self.shards[candidate].copy_of(id, budget)),
        )
        .await;
        let mut best: Option<pb::CopyOfResponse> = None;
        for copy in copies {
            let copy = copy?;
            if copy.found && best.as_ref().is_none_or(|best| copy.version > best.version) {
                best = Some(copy);
            }
        }
        let (version, entries) = best.map_or((0, Vec::new()), |best| (best.version, best.entries));
        let count = entries.len();
        match self.shards[node].restore(entries, budget).await {
            Ok(()) => {
                tracing::info!(
                    node_id = id,
                    entries = count,
                    copy_version = version,
                    "restored a node that started empty"
                );
            }
            // Another coordinator (or an earlier answer that was lost) did it.
            Err(error) if error.reason() == Some(Reason::NotAwaitingRestore) => {}
            Err(error) => return Err(error),
        }
        self.health.set_restoring(node, false);
        Ok(())
    }

    /// Every (origin, replica) pair of the membership, by node index.
    pub fn replica_pairs(&self) -> Vec<(usize, usize)> {
        self.replicas
            .iter()
            .enumerate()
            .flat_map(|(origin, replicas)| replicas.iter().map(move |&replica| (origin, replica)))
            .collect()
    }

    /// Copies `origin`'s changes since `since` to `replica`, if both are
    /// up. `since`: the version the replica was last brought to; `Some(0)`
    /// for everything; `None` if this coordinator does not know (it just
    /// started, or reloaded its membership): then it asks the replica
    /// which version its copy is at, so that a coordinator restart costs a
    /// change set, not a full copy of every node.
    pub async fn replicate_pair(
        &self,
        origin: usize,
        replica: usize,
        since: Option<u64>,
    ) -> std::result::Result<Copied, ShardCallError> {
        if !self.health.is_up(origin) || !self.health.is_up(replica) {
            return Ok(Copied::Unchanged);
        }
        if self.health.is_restoring(origin) {
            // Its copies hold its earlier entries until the restore.
            return Ok(Copied::NeedsFull);
        }
        if self.health.drain(origin).handed_over() {
            // Its entries are with its adopter; it has no changes to give.
            return Ok(Copied::NeedsFull);
        }
        let budget = self.config.shard_timeout;
        let origin_id = self.shards[origin].node_id();
        let since = match since {
            Some(since) => since,
            None => {
                // The replica checks the base of every change set against
                // its copy, and the origin sends everything for a version
                // from another start: a wrong guess costs a full copy, never
                // a wrong one.
                let status = self.shards[replica].brief_status(budget).await;
                self.observe(replica, &status);
                status?
                    .replicas
                    .iter()
                    .find(|copy| copy.origin == origin_id)
                    .map_or(0, |copy| copy.version)
            }
        };
        let changes = self.shards[origin].changes(since, budget).await;
        match changes.as_ref().err().and_then(ShardCallError::reason) {
            Some(Reason::AwaitsRestore) => {
                // Not a failure: the node started empty; restore it first.
                self.health.set_restoring(origin, true);
                return Ok(Copied::NeedsFull);
            }
            Some(Reason::Drained) => return Ok(Copied::NeedsFull),
            _ => {}
        }
        self.observe(origin, &changes);
        let answer = self.shards[replica]
            .replicate(origin_id, since, changes?, budget)
            .await;
        self.observe(replica, &answer);
        let answer = answer?;
        Ok(if answer.accepted {
            Copied::At(answer.version)
        } else {
            Copied::NeedsFull
        })
    }

    /// Node `index`'s health as this coordinator sees it.
    pub fn health(&self, index: usize) -> NodeHealth {
        self.health.get(index)
    }

    /// Counts a failed copy of node `origin`'s entries to a replica (shown
    /// by `ClusterStatus`).
    pub fn record_replication_failure(&self, origin: usize) {
        self.health.record_replication_failure(origin);
    }

    /// Where an increment of `(counter, stripe)` goes now
    /// ([`placement::write_target`]).
    fn target(&self, counter: &str, stripe: u32, keyed: bool) -> usize {
        let hash = tally_ring::key_hash(counter, stripe);
        let state = |node: usize| {
            let (up, draining) = self.health.write_state(node);
            WriteState { up, draining }
        };
        write_target(
            self.ring.owner_of_hash(hash),
            || self.ring.successors(hash),
            state,
            keyed,
        )
    }

    /// Records a call's outcome on the health board.
    ///
    /// A timeout is the node's fault only if the call had a probe's time
    /// at least: a call cut short by a client's tight deadline says
    /// nothing about the node, and must not take it out of routing for
    /// everyone.
    fn observe<T>(&self, node: usize, result: &std::result::Result<T, ShardCallError>) {
        let least = self.config.shard_timeout.min(self.config.health_timeout);
        match result {
            Ok(_) => self.health.record_success(node),
            Err(ShardCallError::TimedOut(budget)) if *budget < least => {}
            Err(ShardCallError::NotSent(_)) => {}
            Err(error) => self.health.record_failure(node, &error.to_string()),
        }
    }

    /// A call's budget for node `index`: a node known to be down gets no
    /// more than a probe's, so one hung node does not hold every read for
    /// the whole shard timeout, while a node that is back is still found.
    fn budget_for(&self, index: usize, budget: std::time::Duration) -> std::time::Duration {
        if self.health.is_up(index) {
            budget
        } else {
            budget.min(self.config.health_timeout)
        }
    }

    /// The configuration this cluster was built from.
    pub fn config(&self) -> &CoordinatorConfig {
        &self.config
    }

    /// The ring.
    pub fn ring(&self) -> &Ring {
        &self.ring
    }

    /// The node clients, indexed like `ring().nodes()`.
    pub fn shards(&self) -> &[ShardClient] {
        &self.shards
    }

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
    /// durable, or the first overflow, or every node that failed.
    pub async fn increment(
        &self,
        increments: Vec<Increment>,
        deadline: Option<Instant>,
    ) -> Result<()> {
        let mut by_node = self.route(increments);
        let mut unavailable = Vec::new();
        let mut refused = None;
        // A node that began a drain after this call was routed sends its
        // increments back unapplied: route them again, once.
        for round in 0..2 {
            let calls = std::mem::take(&mut by_node);
            let mut settle = |node: usize, result: std::result::Result<Vec<Outcome>, _>| {
                self.observe(node, &result);
                match result {
                    Ok(outcomes) => {
                        for outcome in outcomes {
                            match outcome {
                                Outcome::Redirect(increment) if round == 0 => {
                                    self.health.set_drain(node, pb::DrainState::Draining);
                                    let again = self.target(
                                        increment.counter.as_str(),
                                        increment.stripe,
                                        increment.key.is_some(),
                                    );
                                    by_node.entry(again).or_default().push(increment);
                                }
                                Outcome::Redirect(_) => unavailable.push((
                                    self.shards[node].node_id().to_string(),
                                    ShardCallError::Failed("being drained".into()),
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
                    with_deadline(deadline, self.shards[node].apply(increments)).await?,
                );
            } else {
                let calls = calls.into_iter().map(|(node, increments)| async move {
                    (node, self.shards[node].apply(increments).await)
                });
                for (node, result) in with_deadline(deadline, join_all(calls)).await? {
                    settle(node, result);
                }
            }
            if by_node.is_empty() {
                break;
            }
        }
        // UNAVAILABLE first: part of the call was not applied and the client
        // should retry; an overflow or key conflict is reported once every
        // node answered.
        if !unavailable.is_empty() {
            return Err(CoordinatorError::Unavailable(unavailable));
        }
        match refused {
            Some(error) => Err(error),
            None => Ok(()),
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
            let node = self.target(increment.counter.as_str(), stripe, keyed);
            by_node.insert(node, vec![StripeIncrement::new(increment, stripe)]);
            return by_node;
        }
        // Un-keyed increments of a counter seen earlier in this call take
        // the same stripe: one ring lookup per counter per call, and the
        // batcher merges them into one (load still rotates over stripes
        // from call to call). Profiling a batch of 100 on one hot counter
        // showed ring lookups as the coordinator's top symbol (7%).
        let placements = {
            let mut placed: HashMap<&str, (u32, usize)> = HashMap::new();
            increments
                .iter()
                .map(|increment| {
                    let keyed = increment.idempotency_key.is_some();
                    let counter = increment.counter.as_str();
                    if let Some(&earlier) = placed.get(counter).filter(|_| !keyed) {
                        return earlier;
                    }
                    let stripe = self.stripe_for(increment);
                    let node = self.target(counter, stripe, keyed);
                    if !keyed {
                        placed.insert(counter, (stripe, node));
                    }
                    (stripe, node)
                })
                .collect::<Vec<_>>()
        };
        for (increment, (stripe, node)) in increments.into_iter().zip(placements) {
            by_node
                .entry(node)
                .or_default()
                .push(StripeIncrement::new(increment, stripe));
        }
        by_node
    }

    /// Sums counters over every node, one call per node for all of them.
    pub async fn totals(
        &self,
        counters: Vec<CounterName>,
        allow_partial: bool,
        deadline: Option<Instant>,
    ) -> Result<Vec<Total>> {
        let names: Vec<String> = counters.into_iter().map(CounterName::into_string).collect();
        let budget = call_budget(self.config.shard_timeout, deadline);
        let reads = self
            .shards
            .iter()
            .enumerate()
            .map(|(index, shard)| shard.read(names.clone(), self.budget_for(index, budget)));
        let results = with_deadline(deadline, join_all(reads)).await?;
        for (index, result) in results.iter().enumerate() {
            self.observe(index, result);
        }

        // i128: the parts of a counter may each fit in an i64 while the sum
        // does not; that is OUT_OF_RANGE, never a wrapped number.
        let mut sums = vec![0i128; names.len()];
        let mut unavailable = Vec::new();
        let views = self.node_views();
        for node in 0..self.shards.len() {
            match merge::part_of(node, &views, &results) {
                Ok(lists) => {
                    for parts in lists {
                        for (sum, part) in sums.iter_mut().zip(parts) {
                            *sum += part;
                        }
                    }
                }
                Err(error) => unavailable.push((self.shards[node].node_id().to_string(), error)),
            }
        }
        if !unavailable.is_empty() {
            if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
                return Err(CoordinatorError::DeadlineExceeded);
            }
            if !allow_partial {
                return Err(CoordinatorError::Unavailable(unavailable));
            }
        }
        let complete = unavailable.is_empty();
        names
            .into_iter()
            .zip(sums)
            .map(|(counter, sum)| match i64::try_from(sum) {
                Ok(value) => Ok(Total {
                    counter,
                    value,
                    complete,
                }),
                Err(_) => Err(CoordinatorError::TotalOutOfRange { counter }),
            })
            .collect()
    }

    /// Resets a counter to 0 on every node.
    pub async fn delete(&self, counter: CounterName, deadline: Option<Instant>) -> Result<()> {
        let budget = call_budget(self.config.shard_timeout, deadline);
        let counters = vec![counter.into_string()];
        let erases =
            self.shards.iter().enumerate().map(|(index, shard)| {
                shard.erase(counters.clone(), self.budget_for(index, budget))
            });
        let results = with_deadline(deadline, join_all(erases)).await?;
        for (index, result) in results.iter().enumerate() {
            self.observe(index, result);
        }
        let unavailable: Vec<(String, ShardCallError)> = self
            .shards
            .iter()
            .zip(results)
            .filter_map(|(shard, result)| {
                result
                    .err()
                    .map(|error| (shard.node_id().to_string(), error))
            })
            .collect();
        if unavailable.is_empty() {
            Ok(())
        } else {
            Err(CoordinatorError::Unavailable(unavailable))
        }
    }
}

/// The cluster the services use, swapped whole when the membership is
/// reloaded. Calls in flight finish on the cluster they started with.
#[derive(Debug, Clone)]
pub struct ClusterHandle(Arc<parking_lot::RwLock<Arc<Cluster>>>);

/// Why a reloaded config was not applied; the running membership stays.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The new config removes a node: its counts would vanish from reads.
    #[error(
        "node {0:?} is missing from the new config, but it is not drained: removing it would drop \
         its counts from every read (`tallyctl drain {0}` first); nothing changed"
    )]
    NodeRemoved(String),
    /// A setting every coordinator must share changed.
    #[error(
        "{0} changed: it decides where keyed increments go, so every coordinator must change it \
         at once, with a restart; nothing changed"
    )]
    Placement(&'static str),
    /// The new membership does not make a ring or a client.
    #[error("{0}; nothing changed")]
    Invalid(#[from] crate::StartError),
}

impl ClusterHandle {
    /// A handle on `cluster`.
    pub fn new(cluster: Arc<Cluster>) -> Self {
        ClusterHandle(Arc::new(parking_lot::RwLock::new(cluster)))
    }

    /// The cluster as it is now.
    pub fn current(&self) -> Arc<Cluster> {
        self.0.read().clone()
    }

    /// Applies a reloaded config's membership: nodes may be added, and may
    /// change address or weight; none may be removed, and `stripes` and
    /// `vnodes_per_weight` must stay. Adding a node moves no data and
    /// changes no total (a counter is the sum over every node, wherever its
    /// entries are); new increments start landing on it at once. Returns a
    /// one-line summary.
    pub fn reload(&self, config: CoordinatorConfig) -> std::result::Result<String, ReloadError> {
        let mut current = self.0.write();
        let old = current.config();
        let drained = |id: &str| {
            current
                .shards
                .iter()
                .position(|shard| shard.node_id() == id)
                .is_some_and(|index| current.health.drain(index) == pb::DrainState::Drained)
        };
        if let Some(removed) = old
            .nodes
            .iter()
            .find(|node| config.node(&node.id).is_none() && !drained(&node.id))
        {
            return Err(ReloadError::NodeRemoved(removed.id.clone()));
        }
        if config.stripes != old.stripes {
            return Err(ReloadError::Placement("stripes"));
        }
        if config.vnodes_per_weight != old.vnodes_per_weight {
            return Err(ReloadError::Placement("vnodes_per_weight"));
        }
        let added: Vec<&str> = config
            .nodes
            .iter()
            .filter(|node| old.node(&node.id).is_none())
            .map(|node| node.id.as_str())
            .collect();
        let removed: Vec<&str> = old
            .nodes
            .iter()
            .filter(|node| config.node(&node.id).is_none())
            .map(|node| node.id.as_str())
            .collect();
        let mut summary = format!("membership reloaded: {} nodes", config.nodes.len());
        match (added.is_empty(), removed.is_empty()) {
            (true, true) => summary.push_str(", none added"),
            (false, _) => summary.push_str(&format!(", added {}", added.join(", "))),
            (true, false) => {}
        }
        if !removed.is_empty() {
            summary.push_str(&format!(", removed {} (drained)", removed.join(", ")));
        }
        let rebuilt = Cluster::build(config, Some(&current))?;
        *current = rebuilt;
        Ok(summary)
    }
}

/// Runs `future` until the client's deadline, if there is one.
async fn with_deadline<T>(
    deadline: Option<Instant>,
    future: impl std::future::Future<Output = T>,
) -> Result<T> {
    match deadline {
        Some(deadline) => tokio::time::timeout_at(deadline, future)
            .await
            .map_err(|_| CoordinatorError::DeadlineExceeded),
        None => Ok(future.await),
    }
}

/// The error an increment's outcome stands for, if it was refused.
fn refusal(outcome: Outcome) -> Option<CoordinatorError> {
    match outcome {
        Outcome::Applied | Outcome::Redirect(_) => None,
        Outcome::Overflow(increment) => Some(CoordinatorError::IncrementOverflow {
            counter: increment.counter.into_string(),
            delta: increment.delta,
        }),
        Outcome::KeyConflict {
            increment,
            recorded_delta,
        } => Some(CoordinatorError::KeyConflict {
            counter: increment.counter.into_string(),
            key: increment
                .key
                .map(IdempotencyKey::into_string)
                .unwrap_or_default(),
            delta: increment.delta,
            recorded_delta,
        }),
    }
}
