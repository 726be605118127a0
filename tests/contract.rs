//! The public contract, end to end, against a real in-process cluster
//! (coordinator and shard nodes serving gRPC on loopback port 0, with real
//! files in a temporary directory): what each call answers, in what order,
//! bad input and overflow refused without changing anything, delete; and the
//! internal Shard service refusing, with a typed reason, what is not meant
//! for it.

mod support;

use support::cluster::{get, increment, start, start_with, value, READY};
use tally::proto::pb;
use tally::proto::shard_error::{reason_of, Reason};
use tonic::Code;

#[tokio::test]
async fn get_batch_answers_in_request_order() {
    let test = start().await;
    let mut client = test.cluster.counter_client().await.unwrap();
    client.increment(increment("b", 2, "")).await.unwrap();
    client.increment(increment("a", 1, "")).await.unwrap();
    client.increment(increment("c", -3, "")).await.unwrap();
    let order = ["c", "never-written", "a", "b", "a"];
    let totals = client
        .get_batch(pb::GetBatchRequest {
            counters: order.iter().map(|name| name.to_string()).collect(),
            allow_partial: false,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .counters;
    let seen: Vec<(&str, i64)> = totals
        .iter()
        .map(|total| (total.counter.as_str(), total.value))
        .collect();
    assert_eq!(
        seen,
        vec![
            ("c", -3),
            ("never-written", 0),
            ("a", 1),
            ("b", 2),
            ("a", 1)
        ]
    );
    test.cluster.shutdown().await.unwrap();
}

#[tokio::test]
async fn delete_resets_every_stripe_on_every_node() {
    let test = start().await;
    let mut client = test.cluster.counter_client().await.unwrap();
    // Enough increments to touch every stripe, and so every node.
    for _ in 0..40 {
        client.increment(increment("gone", 3, "")).await.unwrap();
    }
    client.increment(increment("kept", 9, "")).await.unwrap();
    assert_eq!(value(&mut client, "gone").await, 120);
    client
        .delete(pb::DeleteRequest {
            counter: "gone".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(value(&mut client, "gone").await, 0);
    assert_eq!(value(&mut client, "kept").await, 9);
    // Deleting again, or a counter that never existed, is fine.
    client
        .delete(pb::DeleteRequest {
            counter: "gone".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    client
        .delete(pb::DeleteRequest {
            counter: "never".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    // A deleted counter starts again from 0, also after a restart.
    client.increment(increment("gone", 4, "")).await.unwrap();
    let mut cluster = test.cluster;
    for shard in 0..3 {
        cluster.restart_shard(shard).await.unwrap();
    }
    cluster.wait_ready(READY).await.unwrap();
    let mut client = cluster.counter_client().await.unwrap();
    assert_eq!(value(&mut client, "gone").await, 4);
    cluster.shutdown().await.unwrap();
}

#[tokio::test]
async fn invalid_input_is_rejected_and_changes_nothing() {
    let test = start().await;
    let mut client = test.cluster.counter_client().await.unwrap();
    let mut admin = test.cluster.admin_client().await.unwrap();
    client.increment(increment("safe", 10, "")).await.unwrap();

    let long_name = "n".repeat(257);
    let long_key = "k".repeat(129);
    let expect_invalid = |result: Result<_, tonic::Status>, what: &str, needle: &str| {
        let status = result.expect_err(what);
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
        assert!(
            status.message().contains(needle),
            "{what}: {:?}",
            status.message()
        );
    };

    expect_invalid(
        client.increment(increment("", 1, "")).await.map(drop),
        "empty name",
        "counter name is empty",
    );
    expect_invalid(
        client
            .increment(increment(&long_name, 1, ""))
            .await
            .map(drop),
        "long name",
        "257 bytes",
    );
    expect_invalid(
        client
            .increment(increment("safe", 1, &long_key))
            .await
            .map(drop),
        "long key",
        "idempotency key is 129 bytes",
    );
    expect_invalid(
        client
            .increment_batch(pb::IncrementBatchRequest {
                increments: vec![increment("safe", 1, ""); 10_001],
            })
            .await
            .map(drop),
        "batch too large",
        "10001 items",
    );
    // One bad item: nothing of the batch is applied, and the message names it.
    expect_invalid(
        client
            .increment_batch(pb::IncrementBatchRequest {
                increments: vec![
                    increment("safe", 100, ""),
                    increment("other", 100, ""),
                    increment("", 1, ""),
                ],
            })
            .await
            .map(drop),
        "bad item",
        "item 2: counter name is empty",
    );
    expect_invalid(get(&mut client, "").await.map(drop), "get empty", "empty");
    expect_invalid(
        client
            .get_batch(pb::GetBatchRequest {
                counters: vec!["safe".into(), long_name.clone()],
                allow_partial: false,
                ..Default::default()
            })
            .await
            .map(drop),
        "get_batch long name",
        "item 1",
    );
    expect_invalid(
        client
            .get_batch(pb::GetBatchRequest {
                counters: vec!["safe".into(); 10_001],
                allow_partial: false,
                ..Default::default()
            })
            .await
            .map(drop),
        "get_batch too large",
        "10001 items",
    );
    expect_invalid(
        client
            .delete(pb::DeleteRequest {
                counter: String::new(),
                ..Default::default()
            })
            .await
            .map(drop),
        "delete empty",
        "empty",
    );
    expect_invalid(
        admin
            .locate(pb::LocateRequest {
                counter: String::new(),
            })
            .await
            .map(drop),
        "locate empty",
        "empty",
    );

    // The server still serves and nothing changed.
    assert_eq!(value(&mut client, "safe").await, 10);
    assert_eq!(value(&mut client, "other").await, 0);
    // Limits are inclusive: 256-byte names, 128-byte keys, 10,000 items work.
    let max_name = "m".repeat(256);
    client
        .increment(increment(&max_name, 1, &"k".repeat(128)))
        .await
        .unwrap();
    client
        .increment_batch(pb::IncrementBatchRequest {
            increments: vec![increment(&max_name, 1, ""); 10_000],
        })
        .await
        .unwrap();
    assert_eq!(value(&mut client, &max_name).await, 10_001);
    // Delta 0 validates and changes nothing.
    client.increment(increment("safe", 0, "")).await.unwrap();
    expect_invalid(
        client.increment(increment("", 0, "")).await.map(drop),
        "empty name with delta 0",
        "empty",
    );
    assert_eq!(value(&mut client, "safe").await, 10);
    test.cluster.shutdown().await.unwrap();
}

#[tokio::test]
async fn overflow_is_out_of_range_and_applies_nothing() {
    // One stripe: every increment of a counter lands on the same entry.
    let test = start_with(|options| options.stripes = 1).await;
    let mut client = test.cluster.counter_client().await.unwrap();
    client
        .increment(increment("big", i64::MAX, ""))
        .await
        .unwrap();
    let status = client.increment(increment("big", 1, "")).await.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(status.message().contains("\"big\""), "{}", status.message());
    assert_eq!(value(&mut client, "big").await, i64::MAX);

    client
        .increment(increment("small", i64::MIN, ""))
        .await
        .unwrap();
    let status = client
        .increment(increment("small", -1, ""))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange);
    assert_eq!(value(&mut client, "small").await, i64::MIN);

    // Going back into range still works.
    client.increment(increment("big", -1, "")).await.unwrap();
    assert_eq!(value(&mut client, "big").await, i64::MAX - 1);
    test.cluster.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_total_beyond_i64_is_out_of_range() {
    let test = start().await;
    let mut client = test.cluster.counter_client().await.unwrap();
    // Two different stripes each hold i64::MAX: each entry fits, the sum does
    // not. Idempotency keys pick the stripes.
    let stripes = test.cluster.coordinator_config().stripes;
    let stripe_of = |key: &str| tally::ring::idempotency_stripe(key, stripes);
    let first = "key-0".to_string();
    let second = (1..)
        .map(|index| format!("key-{index}"))
        .find(|key| stripe_of(key) != stripe_of(&first))
        .unwrap();
    client
        .increment(increment("huge", i64::MAX, &first))
        .await
        .unwrap();
    client
        .increment(increment("huge", i64::MAX, &second))
        .await
        .unwrap();
    let status = get(&mut client, "huge").await.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(status.message().contains("\"huge\""));
    // Back in range once one part shrinks: the sum was exact, never wrapped.
    // (A new key on the first key's stripe: reusing a key is a conflict.)
    let third = (1..)
        .map(|index| format!("again-{index}"))
        .find(|key| stripe_of(key) == stripe_of(&first))
        .unwrap();
    client
        .increment(increment("huge", -i64::MAX, &third))
        .await
        .unwrap();
    assert_eq!(value(&mut client, "huge").await, i64::MAX);
    test.cluster.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_shard_refuses_requests_meant_for_another_node() {
    let test = start().await;
    let shard = test.cluster.shard_configs().next().unwrap().clone();
    let mut shard_client =
        pb::shard_client::ShardClient::connect(format!("http://{}", shard.listen))
            .await
            .unwrap();
    let status = shard_client
        .apply(pb::ApplyRequest {
            node_id: "shard-9".into(),
            protocol_version: tally::proto::SHARD_PROTOCOL_VERSION,
            increments: vec![pb::ShardIncrement {
                counter: "c".into(),
                stripe: 0,
                delta: 1,
                idempotency_key: String::new(),
                ..Default::default()
            }],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(reason_of(&status), Some(Reason::WrongNode));
    assert!(status.message().contains("shard-9"));
    let mut client = test.cluster.counter_client().await.unwrap();
    assert_eq!(value(&mut client, "c").await, 0);
    test.cluster.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_shard_says_why_it_refuses_in_a_typed_reason() {
    // Coordinators decide on the reason in a refusal's details, never on its
    // words: each refusal a coordinator acts on carries its reason and code.
    let test = start().await;
    let shard = test.cluster.shard_configs().next().unwrap().clone();
    let node_id = shard.node_id.clone();
    let mut shard_client =
        pb::shard_client::ShardClient::connect(format!("http://{}", shard.listen))
            .await
            .unwrap();
    // A fresh node awaits its (empty) restore until the coordinator sends
    // it, or this test does: the second restore is refused either way.
    let restore_request = pb::RestoreRequest {
        node_id: node_id.clone(),
        ..Default::default()
    };
    let _ = shard_client.restore(restore_request.clone()).await;
    let restore = shard_client.restore(restore_request).await.unwrap_err();
    let adopt = shard_client
        .adopt(pb::AdoptRequest {
            node_id: node_id.clone(),
            origin: "shard-9".into(),
            version: 1,
        })
        .await
        .unwrap_err();
    let replicate_itself = shard_client
        .replicate(pb::ReplicateRequest {
            node_id: node_id.clone(),
            origin: node_id.clone(),
            full: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    // An Apply from a sender of another protocol version (an older
    // coordinator could not read the answer) is refused before anything
    // is applied.
    let other_version = shard_client
        .apply(pb::ApplyRequest {
            node_id: node_id.clone(),
            protocol_version: tally::proto::SHARD_PROTOCOL_VERSION - 1,
            increments: vec![pb::ShardIncrement {
                counter: "versioned".into(),
                stripe: 0,
                delta: 1,
                idempotency_key: String::new(),
                ..Default::default()
            }],
        })
        .await
        .unwrap_err();
    let bad_stripe = shard_client
        .apply(pb::ApplyRequest {
            node_id: node_id.clone(),
            protocol_version: tally::proto::SHARD_PROTOCOL_VERSION,
            increments: vec![pb::ShardIncrement {
                counter: "c".into(),
                stripe: u32::MAX,
                delta: 1,
                idempotency_key: String::new(),
                ..Default::default()
            }],
        })
        .await
        .unwrap_err();
    for (status, reason, code) in [
        (
            &restore,
            Reason::NotAwaitingRestore,
            Code::FailedPrecondition,
        ),
        (&adopt, Reason::CopyMissing, Code::FailedPrecondition),
        (
            &replicate_itself,
            Reason::InvalidRequest,
            Code::InvalidArgument,
        ),
        (&bad_stripe, Reason::InvalidRequest, Code::InvalidArgument),
        (
            &other_version,
            Reason::InvalidRequest,
            Code::InvalidArgument,
        ),
    ] {
        assert_eq!(reason_of(status), Some(reason), "{status:?}");
        assert_eq!(status.code(), code, "{status:?}");
    }
    let mut client = test.cluster.counter_client().await.unwrap();
    assert_eq!(value(&mut client, "versioned").await, 0);

    // A keyed increment routed by another membership than the one the
    // node's keyed increments are open to (the coordinator opened them to
    // its own at its start): given back unapplied, naming the node's.
    let open_to = support::wait_until("the coordinator to open keyed increments", READY, || {
        let mut shard_client = shard_client.clone();
        async move {
            let status = shard_client
                .status(pb::ShardStatusRequest { brief: true })
                .await
                .map_err(|_| ())?
                .into_inner();
            if status.keyed_ring != 0 && !status.keyed_ring_sealed {
                Ok(status.keyed_ring)
            } else {
                Err(())
            }
        }
    })
    .await;
    let other_membership = shard_client
        .apply(pb::ApplyRequest {
            node_id: node_id.clone(),
            protocol_version: tally::proto::SHARD_PROTOCOL_VERSION,
            increments: vec![pb::ShardIncrement {
                counter: "stood-in".into(),
                delta: 1,
                idempotency_key: "k".into(),
                ring: open_to ^ 1,
                ..Default::default()
            }],
        })
        .await
        .unwrap()
        .into_inner();
    match &other_membership.results[0].outcome {
        Some(pb::apply_result::Outcome::RingRefused(refused)) => {
            assert_eq!((refused.ring, refused.sealed), (open_to, false));
        }
        other => panic!("{other:?}"),
    }
    // A keyed increment sent on behalf of a node whose records this node
    // does not hold (a stale sender): it cannot tell a retry from a new
    // increment, so it applies nothing and says why.
    let stand_in = shard_client
        .apply(pb::ApplyRequest {
            node_id: node_id.clone(),
            protocol_version: tally::proto::SHARD_PROTOCOL_VERSION,
            increments: vec![pb::ShardIncrement {
                counter: "stood-in".into(),
                stripe: 0,
                delta: 1,
                idempotency_key: "k".into(),
                on_behalf_of: "shard-9".into(),
                ring: open_to,
                ..Default::default()
            }],
        })
        .await
        .unwrap()
        .into_inner();
    match &stand_in.results[0].outcome {
        Some(pb::apply_result::Outcome::Unavailable(why)) => {
            assert!(why.contains("shard-9"), "{why}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(value(&mut client, "stood-in").await, 0);

    // Drained through the coordinator: the node refuses its changes as
    // drained, and its writes as draining.
    let mut admin = pb::admin_client::AdminClient::connect(test.cluster.endpoint())
        .await
        .unwrap();
    admin
        .drain(pb::DrainRequest {
            node_id: node_id.clone(),
        })
        .await
        .unwrap();
    let changes = shard_client
        .changes(pb::ChangesRequest {
            node_id: node_id.clone(),
            since: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(reason_of(&changes), Some(Reason::Drained), "{changes:?}");
    let erase = shard_client
        .erase(pb::EraseRequest {
            node_id: node_id.clone(),
            counters: vec!["c".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(reason_of(&erase), Some(Reason::Draining), "{erase:?}");
    assert_eq!(erase.code(), Code::Unavailable);
    test.cluster.shutdown().await.unwrap();
}
