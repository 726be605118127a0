//! The clients' side of the process harnesses (`tests/crash.rs`,
//! `tests/keyed.rs`): a ledger of what was acknowledged, clients that retry
//! every failed call with its keys until it is acknowledged, and the
//! comparison's outcome.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tally::proto::pb;
use tally::proto::pb::counter_client::CounterClient;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

/// Longest a client keeps retrying one call before the test fails.
pub const RETRY_LIMIT: Duration = Duration::from_secs(120);
/// Per-call deadline, so a call to a hung process fails and is retried.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// What the clients know.
#[derive(Debug, Default)]
pub struct Ledger {
    /// Per counter, the sum of acknowledged deltas.
    pub expected: HashMap<String, i64>,
    /// Increments acknowledged (each counted once, however often sent).
    pub increments: u64,
    /// The sum of their deltas.
    pub acknowledged: i64,
    /// Calls that failed and were retried with the same keys.
    pub retried: u64,
    /// Acknowledged calls sent again on purpose.
    pub resent: u64,
    /// When each increment was acknowledged, its counter, key and delta.
    pub acks: Vec<(Instant, String, String, i64)>,
}

impl Ledger {
    pub fn merge(&mut self, other: Ledger) {
        for (counter, delta) in other.expected {
            *self.expected.entry(counter).or_default() += delta;
        }
        self.increments += other.increments;
        self.acknowledged += other.acknowledged;
        self.retried += other.retried;
        self.resent += other.resent;
        self.acks.extend(other.acks);
    }

    /// The cluster's `totals` (every one complete) against this ledger.
    pub fn against(&self, totals: Vec<pb::GetResponse>) -> Outcome {
        let mut outcome = Outcome {
            increments: self.increments,
            acknowledged: self.acknowledged,
            present: 0,
            lost: 0,
            duplicated: 0,
        };
        for total in totals {
            assert!(total.complete, "{total:?}");
            let expected = self.expected.get(&total.counter).copied().unwrap_or(0);
            outcome.present += total.value;
            outcome.lost += (expected - total.value).max(0);
            outcome.duplicated += (total.value - expected).max(0);
        }
        outcome
    }

    pub fn record(&mut self, items: &[pb::IncrementRequest]) {
        let now = Instant::now();
        for item in items {
            *self.expected.entry(item.counter.clone()).or_default() += item.delta;
            self.increments += 1;
            self.acknowledged += item.delta;
            self.acks.push((
                now,
                item.counter.clone(),
                item.idempotency_key.clone(),
                item.delta,
            ));
        }
    }
}

/// The cluster's totals against the ledger.
#[derive(Debug)]
pub struct Outcome {
    pub increments: u64,
    pub acknowledged: i64,
    pub present: i64,
    pub lost: i64,
    pub duplicated: i64,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            formatter,
            "acknowledged {}, present {}, lost {}, duplicated {} ({} increments)",
            self.acknowledged, self.present, self.lost, self.duplicated, self.increments
        )
    }
}

/// Clients of one or more coordinators, sharing a list of their endpoints
/// that a test may change while they run.
#[derive(Clone)]
pub struct Clients {
    endpoints: Arc<RwLock<Vec<String>>>,
}

impl Clients {
    pub fn new(endpoints: Vec<String>) -> Self {
        Clients {
            endpoints: Arc::new(RwLock::new(endpoints)),
        }
    }

    /// From now on, these coordinators.
    pub fn set(&self, endpoints: Vec<String>) {
        *self.endpoints.write().unwrap() = endpoints;
    }

    pub fn endpoint(&self, attempt: usize) -> String {
        let endpoints = self.endpoints.read().unwrap();
        endpoints[attempt % endpoints.len()].clone()
    }
}

/// One client task's connections, by endpoint.
#[derive(Default)]
pub struct Connections(HashMap<String, CounterClient<Channel>>);

impl Connections {
    pub fn client(&mut self, endpoint: &str) -> CounterClient<Channel> {
        self.0
            .entry(endpoint.to_string())
            .or_insert_with(|| {
                let channel = Endpoint::from_shared(endpoint.to_string())
                    .unwrap()
                    .connect_timeout(Duration::from_secs(1))
                    .connect_lazy();
                CounterClient::new(channel)
            })
            .clone()
    }

    /// Sends one call (a unary Increment for one item, a batch otherwise).
    pub async fn send(
        &mut self,
        endpoint: &str,
        items: &[pb::IncrementRequest],
    ) -> Result<(), tonic::Status> {
        send_on(self.client(endpoint), items).await
    }

    /// Sends until acknowledged, retrying with the same keys, rotating over
    /// the coordinators. Returns how many attempts failed.
    pub async fn send_until_acknowledged(
        &mut self,
        clients: &Clients,
        items: &[pb::IncrementRequest],
    ) -> u64 {
        let mut attempts = 0;
        super::wait_until("a call to be acknowledged", RETRY_LIMIT, || {
            let client = self.client(&clients.endpoint(attempts));
            attempts += 1;
            async move {
                let result = send_on(client, items).await;
                if let Err(status) = &result {
                    assert!(
                        !matches!(
                            status.code(),
                            Code::AlreadyExists | Code::InvalidArgument | Code::OutOfRange
                        ),
                        "a retry was refused: {status:?}"
                    );
                }
                result
            }
        })
        .await;
        attempts as u64 - 1
    }
}

/// Sends one call on `client` (a unary Increment for one item, a batch
/// otherwise).
pub async fn send_on(
    mut client: CounterClient<Channel>,
    items: &[pb::IncrementRequest],
) -> Result<(), tonic::Status> {
    if let [item] = items {
        let mut request = tonic::Request::new(item.clone());
        request.set_timeout(CALL_TIMEOUT);
        client.increment(request).await.map(drop)
    } else {
        let mut request = tonic::Request::new(pb::IncrementBatchRequest {
            increments: items.to_vec(),
        });
        request.set_timeout(CALL_TIMEOUT);
        client.increment_batch(request).await.map(drop)
    }
}
