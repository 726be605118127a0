//! A takeover's steps, and a membership change's, on two real shard
//! processes, with this test in the coordinator's place (so no
//! coordinator's own rounds interfere).
//!
//! The takeover: a stand-in taking a node's keyed increments over from its
//! copy, a retry of a key in the copy answered as a duplicate, the copy
//! frozen, the takeover closed, a late end that ends nothing, the node
//! reconciling (twice, and across a restart), and the total exact at the
//! end.
//!
//! The membership change: a node added, the records of the keys it now
//! owns handed on to it before it takes any, a first attempt sent by the
//! old membership refused after the hand-over, across a restart too.

mod support;

use std::path::Path;

use nix::sys::signal::Signal;
use support::Daemon;
use tally::proto::pb;
use tally::proto::pb::apply_result::Outcome;
use tally::proto::pb::shard_client::ShardClient;
use tonic::transport::Channel;

const ORIGIN: &str = "shard-1";
const STAND_IN: &str = "shard-2";
const COUNTER: &str = "taken-over";

fn shard(dir: &Path, id: &str, listen: &str) -> Daemon {
    let data = dir.join(id);
    Daemon::start(
        "tally-shard",
        id,
        &[
            "--node-id",
            id,
            "--listen",
            listen,
            "--data-dir",
            data.to_str().unwrap(),
        ],
        dir,
    )
}

async fn client(node: &Daemon) -> ShardClient<Channel> {
    ShardClient::connect(node.endpoint()).await.unwrap()
}

/// A node that started with an empty directory awaits its restore: none,
/// for a new node.
async fn restore_new(client: &mut ShardClient<Channel>, node_id: &str) {
    client
        .restore(pb::RestoreRequest {
            node_id: node_id.into(),
            ..Default::default()
        })
        .await
        .unwrap();
}

/// Stripes of the memberships here.
const STRIPES: u32 = 64;

/// A membership of `members` (weight 1 each), as a seal names it, and its
/// stamp.
fn membership(members: &[&str]) -> (pb::RingSpec, u64) {
    let nodes: Vec<tally::ring::NodeSpec> = members
        .iter()
        .map(|id| tally::ring::NodeSpec {
            id: id.to_string(),
            weight: 1,
        })
        .collect();
    let ring = tally::ring::Ring::new(&nodes, 64).unwrap();
    let spec = pb::RingSpec {
        members: members
            .iter()
            .map(|id| pb::RingMember {
                id: id.to_string(),
                weight: 1,
            })
            .collect(),
        vnodes_per_weight: 64,
        stripes: STRIPES,
    };
    (spec, ring.keyed_stamp(STRIPES))
}

/// Seals `node_id` for `spec` (change number `epoch`): the records it
/// hands on.
async fn seal(
    client: &mut ShardClient<Channel>,
    node_id: &str,
    spec: &pb::RingSpec,
    stamp: u64,
    epoch: u64,
) -> Result<Vec<pb::KeyRecord>, tonic::Status> {
    client
        .realign(pb::RealignRequest {
            node_id: node_id.into(),
            ring: stamp,
            epoch,
            seal: Some(spec.clone()),
            ..Default::default()
        })
        .await
        .map(|answer| answer.into_inner().records)
}

/// Opens `node_id` to membership `stamp` (change `epoch`) with `records`.
async fn open(
    client: &mut ShardClient<Channel>,
    node_id: &str,
    stamp: u64,
    epoch: u64,
    records: Vec<pb::KeyRecord>,
) -> Result<(), tonic::Status> {
    client
        .realign(pb::RealignRequest {
            node_id: node_id.into(),
            ring: stamp,
            epoch,
            open: true,
            records,
            ..Default::default()
        })
        .await
        .map(|_| ())
}

/// The membership of the takeover test: both nodes.
fn both() -> (pb::RingSpec, u64) {
    membership(&[ORIGIN, STAND_IN])
}

/// Opens both nodes to [`both`], as a coordinator does at its start.
async fn open_both(origin: &mut ShardClient<Channel>, stand_in: &mut ShardClient<Channel>) {
    let (spec, stamp) = both();
    let mut handed = seal(origin, ORIGIN, &spec, stamp, 1).await.unwrap();
    handed.extend(seal(stand_in, STAND_IN, &spec, stamp, 1).await.unwrap());
    assert!(handed.is_empty(), "{handed:?}");
    open(origin, ORIGIN, stamp, 1, Vec::new()).await.unwrap();
    open(stand_in, STAND_IN, stamp, 1, Vec::new())
        .await
        .unwrap();
}

fn increment(key: &str, delta: i64, on_behalf_of: &str) -> pb::ShardIncrement {
    pb::ShardIncrement {
        counter: COUNTER.into(),
        stripe: 0,
        delta,
        idempotency_key: key.into(),
        on_behalf_of: on_behalf_of.into(),
        takeover_max_copy_age_ms: if on_behalf_of.is_empty() { 0 } else { 60_000 },
        ring: both().1,
    }
}

/// Applies `increments` on `node_id`; the outcome of each.
async fn apply(
    client: &mut ShardClient<Channel>,
    node_id: &str,
    increments: Vec<pb::ShardIncrement>,
) -> Vec<Outcome> {
    client
        .apply(pb::ApplyRequest {
            node_id: node_id.into(),
            protocol_version: tally::proto::SHARD_PROTOCOL_VERSION,
            increments,
        })
        .await
        .unwrap()
        .into_inner()
        .results
        .into_iter()
        .map(|result| result.outcome.unwrap())
        .collect()
}

/// The kind of each outcome, for comparing.
fn kinds(outcomes: &[Outcome]) -> Vec<&'static str> {
    outcomes
        .iter()
        .map(|outcome| match outcome {
            Outcome::Applied(_) => "applied",
            Outcome::Duplicate(_) => "duplicate",
            Outcome::Unavailable(_) => "unavailable",
            Outcome::OwnerBack(_) => "owner back",
            Outcome::RingRefused(refused) if refused.sealed => "sealed",
            Outcome::RingRefused(_) => "other membership",
            _ => "other",
        })
        .collect()
}

/// `node_id`'s answer to a read of the counter.
async fn read(client: &mut ShardClient<Channel>, node_id: &str) -> pb::ReadResponse {
    client
        .read(pb::ReadRequest {
            node_id: node_id.into(),
            counters: vec![COUNTER.into()],
        })
        .await
        .unwrap()
        .into_inner()
}

/// `node_id`'s own total of the counter.
async fn own_total(client: &mut ShardClient<Channel>, node_id: &str) -> i64 {
    read(client, node_id).await.counters[0]
        .entries
        .iter()
        .map(|entry| entry.value)
        .sum()
}

async fn standing_in_for(client: &mut ShardClient<Channel>) -> Vec<String> {
    client
        .status(pb::ShardStatusRequest { brief: true })
        .await
        .unwrap()
        .into_inner()
        .standing_in_for
}

/// Copies the origin's changes since `since` to the stand-in, as a
/// replication round does; the replica's answer.
async fn replicate(
    origin: &mut ShardClient<Channel>,
    stand_in: &mut ShardClient<Channel>,
    since: u64,
) -> Result<pb::ReplicateResponse, tonic::Status> {
    let changes = changes(origin, since).await;
    push(stand_in, since, changes).await
}

/// The origin's changes since `since`.
async fn changes(origin: &mut ShardClient<Channel>, since: u64) -> pb::ChangesResponse {
    origin
        .changes(pb::ChangesRequest {
            node_id: ORIGIN.into(),
            since,
        })
        .await
        .unwrap()
        .into_inner()
}

/// Pushes `changes` (scanned since `since`) to the stand-in's copy.
async fn push(
    stand_in: &mut ShardClient<Channel>,
    since: u64,
    changes: pb::ChangesResponse,
) -> Result<pb::ReplicateResponse, tonic::Status> {
    stand_in
        .replicate(pb::ReplicateRequest::of_changes(
            STAND_IN, ORIGIN, since, changes, 0,
        ))
        .await
        .map(tonic::Response::into_inner)
}

async fn reconcile(
    origin: &mut ShardClient<Channel>,
    takeover: u64,
    records: &[pb::KeyRecord],
) -> pb::ReconcileResponse {
    origin
        .reconcile(pb::ReconcileRequest {
            node_id: ORIGIN.into(),
            stand_in: STAND_IN.into(),
            takeover,
            keys: records
                .iter()
                .map(|record| pb::ReconcileKey {
                    counter: record.counter.clone(),
                    key: record.key.clone(),
                    delta: record.delta,
                    stripe: 0,
                })
                .collect(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// Closes the takeover (`end` None) or ends one: its id and the origin's
/// answer to its reconciliation.
async fn stand_in_step(
    stand_in: &mut ShardClient<Channel>,
    end: Option<(u64, &pb::ReconcileResponse)>,
) -> pb::StandInResponse {
    let (takeover, reconciled) = end.map_or((0, None), |(id, answer)| (id, Some(answer)));
    stand_in
        .stand_in(pb::StandInRequest {
            node_id: STAND_IN.into(),
            origin: ORIGIN.into(),
            end: end.is_some(),
            takeover,
            copy_version: reconciled.map_or(0, |reconciled| reconciled.version),
            directory_id: reconciled.map_or(0, |reconciled| reconciled.directory_id),
        })
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_counts_each_key_once_and_a_late_end_ends_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut origin_node = shard(dir.path(), ORIGIN, "127.0.0.1:0");
    let mut stand_in_node = shard(dir.path(), STAND_IN, "127.0.0.1:0");
    let mut origin = client(&origin_node).await;
    let mut stand_in = client(&stand_in_node).await;
    restore_new(&mut origin, ORIGIN).await;
    restore_new(&mut stand_in, STAND_IN).await;
    open_both(&mut origin, &mut stand_in).await;

    // The origin applies two keys; the stand-in's copy gets them; then one
    // more that the copy lacks (in doubt when the origin "failed").
    let own = |key, delta| increment(key, delta, "");
    let applied = apply(&mut origin, ORIGIN, vec![own("a", 5), own("b", 7)]).await;
    assert_eq!(kinds(&applied), ["applied", "applied"]);
    let copied = replicate(&mut origin, &mut stand_in, 0).await.unwrap();
    assert!(copied.accepted, "{copied:?}");
    assert_eq!(
        kinds(&apply(&mut origin, ORIGIN, vec![own("in-doubt", 11)]).await),
        ["applied"]
    );

    // Taken over: a retry of a key in the copy is a duplicate; the key the
    // copy lacks and a new one are applied by the stand-in.
    let for_origin = |key, delta| increment(key, delta, ORIGIN);
    let taken = apply(
        &mut stand_in,
        STAND_IN,
        vec![
            for_origin("a", 5),
            for_origin("in-doubt", 11),
            for_origin("new", 13),
        ],
    )
    .await;
    assert_eq!(kinds(&taken), ["duplicate", "applied", "applied"]);
    assert_eq!(standing_in_for(&mut stand_in).await, [ORIGIN]);
    // Its copy is frozen: what reads count as the origin's part.
    let frozen = replicate(&mut origin, &mut stand_in, copied.version)
        .await
        .unwrap_err();
    assert!(frozen.message().contains("stands in"), "{frozen:?}");

    // Closed: nothing more is taken (given back, for the owner); the
    // records it applied are listed.
    let closed = stand_in_step(&mut stand_in, None).await;
    assert_ne!(closed.takeover, 0);
    let mut listed: Vec<(&str, i64)> = closed
        .records
        .iter()
        .map(|record| (record.key.as_str(), record.delta))
        .collect();
    listed.sort();
    assert_eq!(listed, [("in-doubt", 11), ("new", 13)]);
    assert_eq!(
        kinds(&apply(&mut stand_in, STAND_IN, vec![for_origin("late", 1)]).await),
        ["owner back"]
    );

    // An end meant for another takeover (another coordinator's, late)
    // ends nothing.
    let late = stand_in_step(
        &mut stand_in,
        Some((closed.takeover + 1, &pb::ReconcileResponse::default())),
    )
    .await;
    assert_eq!(late.takeover, closed.takeover);
    assert_eq!(standing_in_for(&mut stand_in).await, [ORIGIN]);

    // A replication round that scans the origin before it reconciles (and
    // is delivered late, below).
    let early = changes(&mut origin, copied.version).await;
    // And a read of the origin answered before it reconciles: it still
    // counts the key in doubt.
    let read_before = read(&mut origin, ORIGIN).await;
    assert_ne!(read_before.directory_id, 0);

    // The origin reconciles: the key both applied is the stand-in's now;
    // asked again, nothing changes.
    let reconciled = reconcile(&mut origin, closed.takeover, &closed.records).await;
    assert_eq!(reconciled.reverted, 1);
    assert!(reconciled.version > early.version);
    assert_eq!(reconciled.directory_id, read_before.directory_id);
    let again = reconcile(&mut origin, closed.takeover, &closed.records).await;
    assert_eq!(again.reverted, 0);
    assert_eq!(own_total(&mut origin, ORIGIN).await, 5 + 7);
    stand_in_step(&mut stand_in, Some((closed.takeover, &reconciled))).await;
    assert!(standing_in_for(&mut stand_in).await.is_empty());
    // A read answered by the stand-in now, with the origin's answer from
    // before its reconciliation, would count the key in doubt twice: the
    // stand-in's answer names the reconciliation, and answers of the
    // origin's directory from before it are below its version (the
    // coordinator reads again: `merge::answered_before_its_reconciliation`).
    let ended = pb::TakeoverEnded {
        origin: ORIGIN.into(),
        version: reconciled.version,
        directory_id: reconciled.directory_id,
    };
    assert_eq!(read(&mut stand_in, STAND_IN).await.takeovers_ended, [ended]);
    assert!(read_before.version < reconciled.version);
    assert!(read(&mut origin, ORIGIN).await.version >= reconciled.version);
    assert_eq!(own_total(&mut stand_in, STAND_IN).await, 11 + 13);
    // Every key the stand-in applied is a retry at the origin now.
    assert_eq!(
        kinds(
            &apply(
                &mut origin,
                ORIGIN,
                vec![own("in-doubt", 11), own("new", 13)]
            )
            .await
        ),
        ["duplicate", "duplicate"]
    );

    // Ended, its copy is of unknown age until a round scanned after the
    // reconciliation reaches it: a coordinator that still sees the origin
    // down cannot begin another takeover on what the last one froze, nor on
    // a copy from before the reconciliation (which still counts the key
    // the origin took out), pushed late.
    let late_push = push(&mut stand_in, copied.version, early).await.unwrap();
    assert!(late_push.accepted, "{late_push:?}");
    assert_eq!(
        kinds(&apply(&mut stand_in, STAND_IN, vec![for_origin("again", 1)]).await),
        ["unavailable"]
    );
    assert!(standing_in_for(&mut stand_in).await.is_empty());

    // A second takeover, once a round has dated the copy again, has a
    // greater id; once it is reconciled, a late reconciliation of the first
    // (another coordinator's) changes nothing: the keys it lists are all
    // recorded at the origin by now, and none may be taken out again.
    let recopied = replicate(&mut origin, &mut stand_in, late_push.version)
        .await
        .unwrap();
    assert!(recopied.accepted, "{recopied:?}");
    assert_eq!(
        kinds(&apply(&mut stand_in, STAND_IN, vec![for_origin("second", 17)]).await),
        ["applied"]
    );
    let second = stand_in_step(&mut stand_in, None).await;
    assert!(second.takeover > closed.takeover);
    // Another round scanned before this reconciliation, pushed after a
    // restart of the stand-in (below).
    let early_again = changes(&mut origin, recopied.version).await;
    let second_reconciled = reconcile(&mut origin, second.takeover, &second.records).await;
    assert_eq!(second_reconciled.reverted, 0);
    stand_in_step(&mut stand_in, Some((second.takeover, &second_reconciled))).await;
    let late = reconcile(&mut origin, closed.takeover, &closed.records).await;
    assert_eq!(late.reverted, 0);
    assert_eq!(own_total(&mut origin, ORIGIN).await, 5 + 7);
    assert_eq!(own_total(&mut stand_in, STAND_IN).await, 11 + 13 + 17);

    // Across a crash of both, nothing moves.
    let (origin_address, stand_in_address) = (origin_node.address, stand_in_node.address);
    origin_node.stop_with(Signal::SIGKILL);
    stand_in_node.stop_with(Signal::SIGKILL);
    origin_node = shard(dir.path(), ORIGIN, &origin_address.to_string());
    stand_in_node = shard(dir.path(), STAND_IN, &stand_in_address.to_string());
    let mut origin = client(&origin_node).await;
    let mut stand_in = client(&stand_in_node).await;
    let late = reconcile(&mut origin, closed.takeover, &closed.records).await;
    assert_eq!(late.reverted, 0);
    assert_eq!(own_total(&mut origin, ORIGIN).await, 5 + 7);
    assert_eq!(own_total(&mut stand_in, STAND_IN).await, 11 + 13 + 17);
    assert!(standing_in_for(&mut stand_in).await.is_empty());
    // The last reconciliation, as reads report it, survives too.
    assert_eq!(
        read(&mut stand_in, STAND_IN).await.takeovers_ended,
        [pb::TakeoverEnded {
            origin: ORIGIN.into(),
            version: second_reconciled.version,
            directory_id: second_reconciled.directory_id,
        }]
    );
    assert_eq!(
        kinds(&apply(&mut origin, ORIGIN, vec![own("new", 13)]).await),
        ["duplicate"]
    );
    // The bound a round must reach to date the copy survives the restart.
    let late_push = push(&mut stand_in, recopied.version, early_again)
        .await
        .unwrap();
    assert!(late_push.accepted, "{late_push:?}");
    assert_eq!(
        kinds(&apply(&mut stand_in, STAND_IN, vec![for_origin("after", 1)]).await),
        ["unavailable"]
    );
    origin_node.terminate();
    stand_in_node.terminate();
}

/// A keyed increment of `key` for membership `stamp`, on the stripe its
/// key picks.
fn keyed(key: &str, delta: i64, stamp: u64) -> pb::ShardIncrement {
    pb::ShardIncrement {
        counter: COUNTER.into(),
        stripe: tally::ring::idempotency_stripe(key, STRIPES),
        delta,
        idempotency_key: key.into(),
        ring: stamp,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_membership_change_hands_records_on_before_a_new_owner_takes_keys() {
    let dir = tempfile::tempdir().unwrap();
    let mut old_node = shard(dir.path(), ORIGIN, "127.0.0.1:0");
    let new_node = shard(dir.path(), STAND_IN, "127.0.0.1:0");
    let mut old = client(&old_node).await;
    let mut new = client(&new_node).await;
    let is_applied = |kind: &&str| *kind == "applied";
    let is_duplicate = |kind: &&str| *kind == "duplicate";

    // A node awaiting the restore of its records cannot hand them on.
    let (alone, alone_stamp) = membership(&[ORIGIN]);
    let restoring = seal(&mut old, ORIGIN, &alone, alone_stamp, 1)
        .await
        .unwrap_err();
    assert_eq!(restoring.code(), tonic::Code::Unavailable, "{restoring:?}");
    restore_new(&mut old, ORIGIN).await;
    restore_new(&mut new, STAND_IN).await;

    // One node; it takes every key.
    let handed = seal(&mut old, ORIGIN, &alone, alone_stamp, 1)
        .await
        .unwrap();
    assert!(handed.is_empty());
    open(&mut old, ORIGIN, alone_stamp, 1, Vec::new())
        .await
        .unwrap();
    let keys: Vec<String> = (0..64).map(|key| format!("key-{key}")).collect();
    let first = keys.iter().map(|key| keyed(key, 3, alone_stamp)).collect();
    assert!(kinds(&apply(&mut old, ORIGIN, first).await)
        .iter()
        .all(is_applied));

    // The second node joins: the keys it owns in the new membership.
    let (grown, grown_stamp) = membership(&[ORIGIN, STAND_IN]);
    let ring = tally::ring::Ring::new(
        &[ORIGIN, STAND_IN].map(|id| tally::ring::NodeSpec {
            id: id.into(),
            weight: 1,
        }),
        64,
    )
    .unwrap();
    let joiner = ring.node_index(STAND_IN).unwrap();
    let mut moving: Vec<&str> = keys
        .iter()
        .filter(|key| ring.key_owner(COUNTER, key, STRIPES) == joiner)
        .map(String::as_str)
        .collect();
    moving.sort_unstable();
    assert!(
        !moving.is_empty() && moving.len() < keys.len(),
        "{moving:?}"
    );

    // Not opened yet: the new node takes none of its keys.
    assert_eq!(
        kinds(&apply(&mut new, STAND_IN, vec![keyed(moving[0], 3, grown_stamp)]).await),
        ["other membership"]
    );
    // Opening before sealing is refused.
    let unsealed = open(&mut old, ORIGIN, grown_stamp, 2, Vec::new())
        .await
        .unwrap_err();
    assert_eq!(unsealed.code(), tonic::Code::Unavailable, "{unsealed:?}");
    // A seal whose membership does not make its stamp is refused.
    let forged = seal(&mut old, ORIGIN, &grown, alone_stamp, 2)
        .await
        .unwrap_err();
    assert_eq!(forged.code(), tonic::Code::InvalidArgument, "{forged:?}");
    // A change numbered below the node's, or of another membership at its
    // number, is superseded: refused.
    let (other, other_stamp) = membership(&[ORIGIN, "shard-9"]);
    for (spec, stamp, epoch) in [(&grown, grown_stamp, 0), (&other, other_stamp, 1)] {
        let stale = seal(&mut old, ORIGIN, spec, stamp, epoch)
            .await
            .unwrap_err();
        assert!(
            matches!(
                stale.code(),
                tonic::Code::Unavailable | tonic::Code::InvalidArgument
            ),
            "{stale:?}"
        );
    }

    // Sealed: the old node hands on exactly the keys the new one owns,
    // and takes no keyed increment of either membership any more (a first
    // attempt of the old membership arriving late).
    let handed = seal(&mut old, ORIGIN, &grown, grown_stamp, 2)
        .await
        .unwrap();
    let mut handed_keys: Vec<&str> = handed.iter().map(|record| record.key.as_str()).collect();
    handed_keys.sort_unstable();
    assert_eq!(handed_keys, moving);
    let from_new = seal(&mut new, STAND_IN, &grown, grown_stamp, 2)
        .await
        .unwrap();
    assert!(from_new.is_empty());
    let late = vec![keyed("late", 1, alone_stamp), keyed("late", 1, grown_stamp)];
    assert_eq!(
        kinds(&apply(&mut old, ORIGIN, late).await),
        ["sealed", "sealed"]
    );
    // Un-keyed increments go on.
    let unkeyed = pb::ShardIncrement {
        counter: COUNTER.into(),
        delta: 100,
        ..Default::default()
    };
    assert_eq!(
        kinds(&apply(&mut old, ORIGIN, vec![unkeyed]).await),
        ["applied"]
    );

    // Another change (another coordinator's, to another membership, with a
    // higher number) seals the new node first: this change can no longer
    // open it, and the node stays sealed.
    let (rival, rival_stamp) = membership(&[ORIGIN, STAND_IN, "shard-9"]);
    seal(&mut new, STAND_IN, &rival, rival_stamp, 3)
        .await
        .unwrap();
    let superseded = open(&mut new, STAND_IN, grown_stamp, 2, handed.clone())
        .await
        .unwrap_err();
    assert_eq!(
        superseded.code(),
        tonic::Code::Unavailable,
        "{superseded:?}"
    );
    assert_eq!(
        kinds(&apply(&mut new, STAND_IN, vec![keyed(moving[0], 3, grown_stamp)]).await),
        ["sealed"]
    );
    // The first change, again with a number above every node's, finishes.
    let again = seal(&mut old, ORIGIN, &grown, grown_stamp, 4)
        .await
        .unwrap();
    assert_eq!(again.len(), handed.len());
    let from_new = seal(&mut new, STAND_IN, &grown, grown_stamp, 4)
        .await
        .unwrap();
    assert!(from_new.is_empty());
    open(&mut new, STAND_IN, grown_stamp, 4, handed)
        .await
        .unwrap();
    // A stand-in takes over only a node its copy shows open to its own
    // membership and change: sealed and not yet opened (as if it failed
    // in between), the old node lacks the records handed on for its keys.
    let copied = replicate(&mut old, &mut new, 0).await.unwrap();
    assert!(copied.accepted, "{copied:?}");
    let staying = keys
        .iter()
        .find(|key| !moving.contains(&key.as_str()))
        .unwrap();
    let for_old = || vec![increment(staying, 3, ORIGIN)];
    assert_eq!(
        kinds(&apply(&mut new, STAND_IN, for_old()).await),
        ["unavailable"]
    );
    open(&mut old, ORIGIN, grown_stamp, 4, Vec::new())
        .await
        .unwrap();
    // Opened, and a round says so: the copy may stand in (the key is in
    // it: a retry).
    let recopied = replicate(&mut old, &mut new, copied.version).await.unwrap();
    assert!(recopied.accepted, "{recopied:?}");
    assert_eq!(
        kinds(&apply(&mut new, STAND_IN, for_old()).await),
        ["duplicate"]
    );
    assert_eq!(standing_in_for(&mut new).await, [ORIGIN]);

    // Opened: a retry of every moved key is a duplicate on its new owner;
    // the old one takes keys of the new membership only.
    let retries = moving
        .iter()
        .map(|key| keyed(key, 3, grown_stamp))
        .collect();
    assert!(kinds(&apply(&mut new, STAND_IN, retries).await)
        .iter()
        .all(is_duplicate));
    let both_memberships = vec![
        keyed(staying, 3, grown_stamp),
        keyed(staying, 3, alone_stamp),
    ];
    assert_eq!(
        kinds(&apply(&mut old, ORIGIN, both_memberships).await),
        ["duplicate", "other membership"]
    );

    // Across a crash, the old node stays in the new membership.
    let address = old_node.address;
    old_node.stop_with(Signal::SIGKILL);
    old_node = shard(dir.path(), ORIGIN, &address.to_string());
    let mut old = client(&old_node).await;
    let after = vec![
        keyed(moving[0], 3, alone_stamp),
        keyed(staying, 3, grown_stamp),
    ];
    assert_eq!(
        kinds(&apply(&mut old, ORIGIN, after).await),
        ["other membership", "duplicate"]
    );
    // Nothing counted twice: 64 keys of 3, and the un-keyed 100.
    assert_eq!(
        own_total(&mut old, ORIGIN).await + own_total(&mut new, STAND_IN).await,
        64 * 3 + 100
    );
    old_node.terminate();
    drop(new_node);
}
