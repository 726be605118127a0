//! Draining a node, against an in-process cluster: its entries move to an
//! adopter once and writes go around it; a drain cut off at any step resumes
//! and counts everything once.

mod support;

use support::cluster::{
    increment, key_owned_by, shard_client, shard_statuses, spread, start, value,
    wait_until_restored,
};
use tally::cli::local_cluster::LocalCluster;
use tally::proto::pb;
use tonic::Code;

async fn drain(cluster: &LocalCluster, node: &str) -> Result<pb::DrainResponse, tonic::Status> {
    let mut admin = cluster.admin_client().await.unwrap();
    admin
        .drain(pb::DrainRequest {
            node_id: node.into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test]
async fn a_drain_moves_a_nodes_entries_once_and_routes_around_it() {
    let test = start().await;
    let cluster = test.cluster;
    let mut client = cluster.counter_client().await.unwrap();
    spread(&cluster, &mut client, "drained").await;
    let before = shard_statuses(&cluster).await;
    assert!(before[1].entries > 0);

    let drained = drain(&cluster, "shard-2").await.unwrap();
    assert!(drained.entries > 0);
    assert_eq!(value(&mut client, "drained").await, 60);
    let after = shard_statuses(&cluster).await;
    assert_eq!(after[1].drain_state(), pb::DrainState::Drained);
    // The adopter's own entries now hold shard-2's 20 as well as its own.
    let adopter = after
        .iter()
        .position(|status| status.node_id == drained.adopter)
        .unwrap();
    let own = shard_client(&cluster, adopter)
        .await
        .read(pb::ReadRequest {
            node_id: drained.adopter.clone(),
            counters: vec!["drained".into()],
        })
        .await
        .unwrap()
        .into_inner();
    let own_total: i64 = own.counters[0]
        .entries
        .iter()
        .map(|entry| entry.value)
        .sum();
    assert_eq!(own_total, 40, "the adopter's 20 and shard-2's 20");
    assert!(
        own.replicas.iter().all(|copy| copy.origin != "shard-2"),
        "copy dropped"
    );

    // Its idempotency records moved with its entries: a retry of a keyed
    // increment it applied before the drain reaches its adopter, standing
    // in for it, and is not applied again.
    for nth in 0..2 {
        let key = key_owned_by(&cluster, "drained", "shard-2", nth);
        let retry = client
            .increment(increment("drained", 10, &key))
            .await
            .unwrap()
            .into_inner();
        assert!(retry.deduplicated, "retry {nth} after the drain: {retry:?}");
    }
    assert_eq!(value(&mut client, "drained").await, 60);

    // Writes go around it, keyed ones too; it answers for nothing.
    for nth in 0..3 {
        let key = key_owned_by(&cluster, "drained", "shard-2", 10 + nth);
        let first = client
            .increment(increment("drained", 1, &key))
            .await
            .unwrap()
            .into_inner();
        assert!(!first.deduplicated);
        let again = client
            .increment(increment("drained", 1, &key))
            .await
            .unwrap()
            .into_inner();
        assert!(again.deduplicated, "a new key's retry, on the stand-in");
    }
    client.increment(increment("drained", 1, "")).await.unwrap();
    assert_eq!(value(&mut client, "drained").await, 64);
    assert_eq!(shard_statuses(&cluster).await[1].entries, before[1].entries);
    // Again: nothing more moves.
    assert_eq!(drain(&cluster, "shard-2").await.unwrap().entries, 0);
    assert_eq!(value(&mut client, "drained").await, 64);
    // Unknown nodes and the last node are refused.
    assert_eq!(
        drain(&cluster, "shard-9").await.unwrap_err().code(),
        Code::NotFound
    );
    cluster.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_drain_cut_off_at_any_step_resumes_and_counts_once() {
    // What a coordinator that died mid-drain leaves, step by step; the
    // totals are exact at each step, and a new drain finishes the job.
    for steps_done in 1..=3 {
        let test = start().await;
        let cluster = test.cluster;
        let mut client = cluster.counter_client().await.unwrap();
        // Fresh nodes are restored (from nothing) first; this test drives
        // the internal calls itself.
        wait_until_restored(&cluster).await;
        spread(&cluster, &mut client, "resumed").await;
        let mut node = shard_client(&cluster, 1).await;
        let adopter_index = {
            let ring = cluster.coordinator_config().ring().unwrap();
            tally::coordinator::replicas_of(&ring, 1, 2)[0]
        };
        let adopter_id = format!("shard-{}", adopter_index + 1);
        node.drain(pb::ShardDrainRequest {
            node_id: "shard-2".into(),
            phase: pb::DrainPhase::StopWrites as i32,
            adopter: String::new(),
            version: 0,
        })
        .await
        .unwrap();
        assert_eq!(value(&mut client, "resumed").await, 60, "stopped writes");
        // A retry of a keyed increment shard-2 applied: while its records
        // are not yet handed over, it has nowhere to go (UNAVAILABLE, retry).
        let retried = increment(
            "resumed",
            10,
            &key_owned_by(&cluster, "resumed", "shard-2", 0),
        );
        if steps_done == 1 {
            let status = client.increment(retried.clone()).await.unwrap_err();
            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
            assert_eq!(value(&mut client, "resumed").await, 60);
        }
        if steps_done >= 2 {
            let changes = node
                .changes(pb::ChangesRequest {
                    node_id: "shard-2".into(),
                    since: 0,
                })
                .await
                .unwrap()
                .into_inner();
            let changes_version = changes.version;
            assert!(changes.full);
            let mut adopter = shard_client(&cluster, adopter_index).await;
            adopter
                .replicate(pb::ReplicateRequest::of_changes(
                    &adopter_id,
                    "shard-2",
                    0,
                    changes,
                    0,
                ))
                .await
                .unwrap();
            node.drain(pb::ShardDrainRequest {
                node_id: "shard-2".into(),
                phase: pb::DrainPhase::HandedOver as i32,
                adopter: adopter_id.clone(),
                version: changes_version,
            })
            .await
            .unwrap();
            assert_eq!(value(&mut client, "resumed").await, 60, "handed over");
            // Handed over, records included: once this coordinator has seen
            // it (a probe), the retry goes to the adopter, which finds the
            // key in its copy of shard-2's records (and, adopted, in its
            // own) and applies nothing.
            let answer = support::wait_until("the retry to be answered", support::PATIENCE, || {
                let mut client = client.clone();
                let retried = retried.clone();
                async move { client.increment(retried).await }
            })
            .await
            .into_inner();
            assert!(answer.deduplicated, "after {steps_done} steps: {answer:?}");
            assert_eq!(value(&mut client, "resumed").await, 60, "retried");
            if steps_done >= 3 {
                adopter
                    .adopt(pb::AdoptRequest {
                        node_id: adopter_id.clone(),
                        origin: "shard-2".into(),
                        version: changes_version,
                    })
                    .await
                    .unwrap();
                assert_eq!(value(&mut client, "resumed").await, 60, "adopted");
            }
        }
        let drained = drain(&cluster, "shard-2").await.unwrap();
        assert_eq!(drained.adopter, adopter_id);
        assert_eq!(
            value(&mut client, "resumed").await,
            60,
            "resumed after {steps_done} steps"
        );
        assert_eq!(
            shard_statuses(&cluster).await[1].drain_state(),
            pb::DrainState::Drained
        );
        cluster.shutdown().await.unwrap();
    }
}
