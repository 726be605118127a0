//! Reads and deletes: one call per node for any number of counters, and
//! the merge of their answers ([`crate::merge`]).

use futures::future::join_all;
use tally_proto::domain::CounterName;
use tokio::time::Instant;

use super::{with_deadline, Cluster};
use crate::deadline::call_budget;
use crate::error::{CoordinatorError, Result, ShardCallError};
use crate::merge::{self, NodeView};

/// One counter's total as a read found it.
#[derive(Debug)]
pub struct Total {
    /// The counter.
    pub counter: String,
    /// Sum of the parts that were read.
    pub value: i64,
    /// Every node's part was read.
    pub complete: bool,
    /// Why the counter has no total (`value` is 0 then): the other
    /// counters of a `GetBatch` are answered all the same.
    pub error: Option<CoordinatorError>,
}

impl Total {
    /// The total, or why there is none.
    pub fn into_result(self) -> Result<Total> {
        match self.error {
            Some(error) => Err(error),
            None => Ok(self),
        }
    }
}

/// Reads of every node for one call, at most: another is needed only when
/// one straddled the end of a takeover (`merge::answered_before_its_reconciliation`),
/// which happens once per takeover.
const READ_ATTEMPTS: u32 = 3;

impl Cluster {
    /// What the read merge needs to know of each node now
    /// ([`merge::NodeView`]). Health is looked up only for the nodes that
    /// did not answer: only their part depends on it.
    ///
    /// `began`: when the read was sent. A copy may stand in for a node that
    /// did not answer if a replication round that reached it began at most
    /// one replication interval and one detection window before the node
    /// failed: detection lags a failure by up to that window, and rounds
    /// run every interval. The failure's time is this coordinator's
    /// (monotonic clock); the copy's age the replica's (its monotonic
    /// clock, counted back from its answer, which came after `began`): so
    /// `began - age` is no later than the round began, give or take the
    /// transit of the round's Replicate request (the replica dates the copy
    /// on its arrival), and no clock readings of two nodes are compared.
    /// Every instant here is the process's monotonic clock (`std`), like
    /// the health board's and the replication rounds': not tokio's, which a
    /// test may pause.
    fn node_views(
        &self,
        answers: &[merge::Answer],
        began: std::time::Instant,
    ) -> Vec<NodeView<'_>> {
        let now = std::time::Instant::now();
        self.shards
            .iter()
            .enumerate()
            .map(|(node, shard)| {
                let allowance = self.copy_allowance(node);
                let (handed_over, failed) = if answers[node].is_ok() {
                    (false, now)
                } else {
                    let (up, since, drain) = self.health.failure_view(node);
                    // A node found down failed then at the latest: a copy
                    // recent enough for that time is recent enough.
                    (drain.handed_over(), if up { now } else { since })
                };
                // The copy's round must have begun at or after
                // `failed - allowance`; it began at or after `began - age`.
                let max_copy_age = (began + allowance).checked_duration_since(failed);
                let vouched = if answers[node].is_ok() {
                    Vec::new()
                } else {
                    let rounds = self.rounds.lock();
                    self.replicas[node]
                        .iter()
                        .filter_map(|&replica| {
                            let &(version, round_began) = rounds.get(&(node, replica))?;
                            (round_began + allowance >= failed).then_some((replica, version))
                        })
                        .collect()
                };
                NodeView {
                    id: shard.node_id(),
                    replicas: &self.replicas[node],
                    handed_over,
                    max_copy_age_ms: max_copy_age.map_or(-1, |age| age.as_millis() as i64),
                    vouched,
                }
            })
            .collect()
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
        let mut attempt = 1;
        let (results, views) = loop {
            // Before any read is queued: every answer comes from a call sent
            // after it (a read joins the next call, never one in flight).
            let began = std::time::Instant::now();
            let reads =
                self.shards.iter().enumerate().map(|(index, shard)| {
                    shard.read(names.clone(), self.budget_for(index, budget))
                });
            let results = with_deadline(deadline, join_all(reads)).await?;
            for (index, result) in results.iter().enumerate() {
                self.observe(index, result);
            }
            let views = self.node_views(&results, began);
            match merge::answered_before_its_reconciliation(&views, &results) {
                Some(node) if attempt < READ_ATTEMPTS => {
                    tracing::debug!(
                        node_id = self.shards[node].node_id(),
                        "a read straddled the end of a takeover; reading again"
                    );
                    attempt += 1;
                }
                Some(node) => {
                    return Err(CoordinatorError::Unavailable(vec![(
                        self.shards[node].node_id().to_string(),
                        ShardCallError::Failed(format!(
                            "each of {READ_ATTEMPTS} reads straddled the end of its takeover"
                        )),
                    )]))
                }
                None => break (results, views),
            }
        };

        // i128: the parts of a counter may each fit in an i64 while the sum
        // does not; that is OUT_OF_RANGE, never a wrapped number.
        let mut sums = vec![0i128; names.len()];
        let mut unavailable = Vec::new();
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
        let expired = results.iter().any(|answer| {
            answer
                .as_ref()
                .is_ok_and(|read| read.expired.iter().any(|&expired| expired))
        });
        Ok(names
            .into_iter()
            .zip(sums)
            .enumerate()
            .map(|(index, (counter, sum))| {
                let ended = expired
                    .then(|| self.window_ended(&counter, index, &results))
                    .flatten();
                let (value, error) = match (ended, i64::try_from(sum)) {
                    (Some(error), _) => (0, Some(error)),
                    (None, Ok(value)) => (value, None),
                    (None, Err(_)) => (
                        0,
                        Some(CoordinatorError::TotalOutOfRange {
                            counter: tally_proto::window::describe(&counter),
                        }),
                    ),
                };
                Total {
                    counter,
                    value,
                    complete: complete && error.is_none(),
                    error,
                }
            })
            .collect())
    }

    /// The error for counter `index` (`counter`) if a node answered that
    /// its window has ended by its clock: that node may have reclaimed
    /// some of its parts, so no total of it is right. This coordinator's
    /// clock is still in the window (it chose it), so the two clocks differ
    /// by more than the node's grace.
    fn window_ended(
        &self,
        counter: &str,
        index: usize,
        results: &[merge::Answer],
    ) -> Option<CoordinatorError> {
        let (node, read) = results.iter().enumerate().find_map(|(node, answer)| {
            let read = answer.as_ref().ok()?;
            (read.expired.get(index) == Some(&true)).then_some((node, read))
        })?;
        let end = tally_proto::window::Window::end_of_stored(counter).unwrap_or_default();
        Some(CoordinatorError::WindowEnded(format!(
            "{}: ended {} ms ago by the clock of {}, which may have reclaimed it, while this \
             coordinator's clock is still in it ({} ms before its end): their clocks differ by \
             more than the node's window_grace_ms; nothing read or applied",
            tally_proto::window::describe(counter),
            read.now_unix_ms.saturating_sub(end),
            self.shards[node].node_id(),
            end.saturating_sub(tally_proto::window::now_unix_ms()),
        )))
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
