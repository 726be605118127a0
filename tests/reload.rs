//! Reloading the coordinator's membership: what would move keys or drop
//! counts is refused, adding a node is accepted (in process), and keyed
//! retries straddling a change apply once (real processes).

mod support;

#[tokio::test]
async fn a_reload_refuses_what_would_move_keys_or_drop_counts() {
    use tally::coordinator::{Cluster, ClusterHandle, NodeConfig, ReloadError};
    let node = |id: &str, port: u16| NodeConfig {
        id: id.into(),
        address: format!("127.0.0.1:{port}"),
        weight: 1,
    };
    let listen = "127.0.0.1:0".parse().unwrap();
    let config =
        tally::coordinator::CoordinatorConfig::new(listen, vec![node("a", 1), node("b", 2)]);
    let handle = ClusterHandle::new(Cluster::new(config.clone()).unwrap());

    let mut restriped = config.clone();
    restriped.stripes = 16;
    assert!(matches!(
        handle.reload(restriped),
        Err(ReloadError::Placement("stripes"))
    ));
    let mut dropped = config.clone();
    dropped.nodes.pop();
    assert!(matches!(handle.reload(dropped), Err(ReloadError::NodeRemoved(id)) if id == "b"));
    assert_eq!(handle.current().shards().len(), 2);

    let mut grown = config.clone();
    grown.nodes.push(node("c", 3));
    assert_eq!(
        handle.reload(grown).unwrap(),
        "membership reloaded: 3 nodes, added c"
    );
    assert_eq!(handle.current().shards().len(), 3);
    assert_eq!(handle.current().ring().nodes().len(), 3);
}

/// Keyed retries that straddle membership changes, with real processes: a
/// node added by SIGHUP, a drained node removed by SIGHUP. Every keyed
/// increment acknowledged before a change is sent again after it (the
/// retry of a client whose answer was lost); about a quarter of the keys
/// have a new owner after the first change, so a new owner that did not
/// get the old owner's records would apply them again. A second
/// coordinator not reloaded yet refuses keyed increments (its membership
/// is not the cluster's any more) and takes them once reloaded.
#[test]
fn keyed_retries_straddling_membership_changes_apply_once() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    use support::ledger::{send_on, Connections, Ledger};
    use support::ProcessCluster;
    use tally::proto::pb;

    let runtime = support::runtime();
    let mut cluster = ProcessCluster::start("sync");
    let dir = cluster.dir.path().to_path_buf();
    let second = cluster.start_coordinator("coordinator-b", "127.0.0.1:0");
    let counters: Vec<String> = (0..4).map(|index| format!("straddled-{index}")).collect();
    let calls: Vec<pb::IncrementRequest> = (0..240)
        .map(|index| pb::IncrementRequest {
            counter: counters[index % counters.len()].clone(),
            delta: (index as i64 % 97) + 1,
            idempotency_key: format!("straddle-{index}"),
            ..Default::default()
        })
        .collect();
    let mut ledger = Ledger::default();
    let mut connections = Connections::default();
    let endpoint = cluster.coordinator.endpoint();
    // Every call sent (again) through a coordinator, each acknowledged.
    let send_all = |connections: &mut Connections, endpoint: &str| {
        runtime.block_on(async {
            for call in &calls {
                connections
                    .send(endpoint, std::slice::from_ref(call))
                    .await
                    .unwrap_or_else(|status| panic!("{}: {status:?}", call.idempotency_key));
            }
        });
    };
    send_all(&mut connections, &endpoint);
    ledger.record(&calls);
    let exact = |ledger: &Ledger, what: &str| {
        let totals = runtime.block_on(support::totals(&endpoint, &counters));
        let outcome = ledger.against(totals);
        support::report(&format!("{what}: {outcome}"));
        assert_eq!(
            (outcome.lost, outcome.duplicated),
            (0, 0),
            "{what}: {outcome}"
        );
    };
    let reload = |pid: u32| kill(Pid::from_raw(pid as i32), Signal::SIGHUP).unwrap();
    let moved = |daemon: &support::Daemon, count: usize| {
        runtime.block_on(support::wait_until(
            "keyed increments to move to the new membership",
            support::PATIENCE,
            || {
                let moved = daemon.log().matches("every node open to it").count();
                std::future::ready(if moved >= count { Ok(()) } else { Err(moved) })
            },
        ))
    };

    // shard-4 added, on the first coordinator only.
    let addresses = cluster.start_new_shard(4);
    support::write_coordinator_config(&dir, &addresses);
    reload(cluster.coordinator.pid());
    moved(&cluster.coordinator, 2);
    send_all(&mut connections, &endpoint);
    exact(
        &ledger,
        "every keyed call sent again after shard-4 was added",
    );

    // The second coordinator, not reloaded, routes by the old membership:
    // its keyed increments are refused, its un-keyed ones taken.
    let stale = runtime.block_on(async {
        send_on(
            connections.client(&second.endpoint()),
            std::slice::from_ref(&calls[0]),
        )
        .await
    });
    let refused = stale.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(
        refused.message().contains("another membership"),
        "{refused:?}"
    );
    let shown = support::run_to_end("tallyctl", &["--endpoint", &second.endpoint(), "status"]);
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(
        shown.contains("shard-1: keyed increments follow another coordinator's membership"),
        "{shown}"
    );
    let current = cluster.tallyctl(&["--json", "status"]);
    let current: serde_json::Value = serde_json::from_slice(&current.stdout).unwrap();
    for node in current["nodes"].as_array().unwrap() {
        assert_eq!(node["keyed_membership"], "current", "{node}");
    }
    let unkeyed = pb::IncrementRequest {
        counter: counters[0].clone(),
        delta: 5,
        idempotency_key: String::new(),
        ..Default::default()
    };
    runtime
        .block_on(async {
            send_on(
                connections.client(&second.endpoint()),
                std::slice::from_ref(&unkeyed),
            )
            .await
        })
        .unwrap();
    ledger.record(std::slice::from_ref(&unkeyed));
    // Reloaded, it takes them, once.
    reload(second.pid());
    moved(&second, 2);
    send_all(&mut connections, &second.endpoint());
    exact(
        &ledger,
        "every keyed call sent again through the second coordinator, reloaded",
    );

    // shard-2 drained, then removed from both coordinators' membership.
    let drained = cluster.tallyctl(&["drain", "shard-2"]);
    assert!(
        drained.status.success(),
        "{}",
        String::from_utf8_lossy(&drained.stderr)
    );
    send_all(&mut connections, &endpoint);
    support::write_coordinator_config_of(
        &dir,
        &[
            ("shard-1", addresses[0]),
            ("shard-3", addresses[2]),
            ("shard-4", addresses[3]),
        ],
    );
    reload(cluster.coordinator.pid());
    reload(second.pid());
    moved(&cluster.coordinator, 3);
    moved(&second, 3);
    cluster.shards[1].take().unwrap().terminate();
    send_all(&mut connections, &endpoint);
    send_all(&mut connections, &second.endpoint());
    exact(
        &ledger,
        "every keyed call sent again after shard-2 was drained and removed",
    );
    drop(second);

    // A node down when a node is added: keys cannot move, so the reload is
    // refused (nothing changes, keyed increments go on by the current
    // membership); once the node is back, the same reload applies and
    // retries apply once.
    let down = cluster.shards[2]
        .take()
        .unwrap()
        .stop_with_address(Signal::SIGKILL);
    support::wait_for_shown_health(&runtime, &cluster, "shard-3", "down");
    cluster.start_new_shard(5);
    let fifth = cluster.shards.last().unwrap().as_ref().unwrap().address;
    support::write_coordinator_config_of(
        &dir,
        &[
            ("shard-1", addresses[0]),
            ("shard-3", down),
            ("shard-4", addresses[3]),
            ("shard-5", fifth),
        ],
    );
    reload(cluster.coordinator.pid());
    runtime.block_on(support::wait_until(
        "the reload to be refused",
        support::PATIENCE,
        || {
            let log = cluster.coordinator.log();
            std::future::ready(if log.contains("reload refused: node shard-3 is down") {
                Ok(())
            } else {
                Err(())
            })
        },
    ));
    runtime.block_on(support::wait_until(
        "a keyed increment through the current membership",
        support::PATIENCE,
        || {
            send_on(
                connections.client(&endpoint),
                std::slice::from_ref(&calls[1]),
            )
        },
    ));
    cluster.restart_shard(2, down);
    support::wait_for_shown_health(&runtime, &cluster, "shard-3", "up");
    // Sent again until applied: a takeover of shard-3 (if the keyed call
    // above began one) may still be ending as the coordinator sees it.
    runtime.block_on(support::wait_until_reconciled(&cluster));
    for attempt in 1.. {
        let log = cluster.coordinator.log();
        let refused = log.matches("reload refused").count();
        reload(cluster.coordinator.pid());
        let applied = runtime.block_on(support::wait_until(
            "the reload to apply or be refused",
            support::PATIENCE,
            || {
                let log = cluster.coordinator.log();
                std::future::ready(if log.matches("every node open to it").count() >= 4 {
                    Ok(true)
                } else if log.matches("reload refused").count() > refused {
                    Ok(false)
                } else {
                    Err(())
                })
            },
        ));
        if applied {
            break;
        }
        assert!(attempt < 50, "{}", cluster.coordinator.log());
    }
    send_all(&mut connections, &endpoint);
    exact(
        &ledger,
        "every keyed call sent again after shard-5 was added once shard-3 was back",
    );
}

/// A node that crashes in the middle of a membership change, between its
/// seal and its open (a real crash, through the `TALLY_SHARD_CRASH_AT`
/// hook): the others are opened and take their keys; the crashed node's
/// keys fail, unapplied (its stand-in does not take them over: its copy
/// shows it sealed, without the records handed on to it); once it is back
/// the change is finished, and every keyed call sent again applies once.
#[test]
fn a_node_crashing_between_its_seal_and_its_open_holds_back_only_its_keys() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    use support::ledger::{send_on, Connections, Ledger};
    use support::ProcessCluster;
    use tally::proto::pb;

    const STRIPES: u32 = 8; // as support::write_coordinator_config sets
    let runtime = support::runtime();
    let mut cluster = ProcessCluster::start("sync");
    let dir = cluster.dir.path().to_path_buf();
    let endpoint = cluster.coordinator.endpoint();
    let counter = "crash-in-change".to_string();
    let call = |key: String| pb::IncrementRequest {
        counter: counter.clone(),
        delta: 7,
        idempotency_key: key,
        ..Default::default()
    };
    let mut connections = Connections::default();
    let mut ledger = Ledger::default();
    let before: Vec<pb::IncrementRequest> = (0..60)
        .map(|index| call(format!("before-{index}")))
        .collect();
    runtime.block_on(async {
        for item in &before {
            connections
                .send(&endpoint, std::slice::from_ref(item))
                .await
                .unwrap();
        }
    });
    ledger.record(&before);

    // shard-2 again, set to crash when a change's open reaches it.
    let address = cluster.shards[1]
        .take()
        .unwrap()
        .stop_with_address(Signal::SIGTERM);
    cluster.restart_shard_with_env(
        1,
        address,
        &[],
        &[(
            "TALLY_SHARD_CRASH_AT",
            tally::shard::crash_point::REALIGN_OPEN,
        )],
    );
    support::wait_for_shown_health(&runtime, &cluster, "shard-2", "up");

    let addresses = cluster.start_new_shard(4);
    support::write_coordinator_config(&dir, &addresses);
    kill(
        Pid::from_raw(cluster.coordinator.pid() as i32),
        Signal::SIGHUP,
    )
    .unwrap();
    runtime.block_on(support::wait_until(
        "shard-2 to crash",
        support::PATIENCE,
        || {
            let running = cluster.shards[1].as_mut().unwrap().is_running();
            std::future::ready(if running { Err(()) } else { Ok(()) })
        },
    ));

    // The new membership's owner of each new key.
    let nodes: Vec<tally::ring::NodeSpec> = (1..=4)
        .map(|index| tally::ring::NodeSpec {
            id: format!("shard-{index}"),
            weight: 1,
        })
        .collect();
    let ring = tally::ring::Ring::new(&nodes, tally::ring::DEFAULT_VNODES_PER_WEIGHT).unwrap();
    let crashed = ring.node_index("shard-2").unwrap();
    let during: Vec<pb::IncrementRequest> = (0..60)
        .map(|index| call(format!("during-{index}")))
        .collect();
    let (mut taken, mut held) = (0, 0);
    for item in &during {
        let owner = ring.key_owner(&counter, &item.idempotency_key, STRIPES);
        let answer = runtime.block_on(async {
            send_on(connections.client(&endpoint), std::slice::from_ref(item)).await
        });
        if owner == crashed {
            let refused = answer.unwrap_err();
            assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
            held += 1;
        } else {
            answer.unwrap_or_else(|status| panic!("{}: {status:?}", item.idempotency_key));
            taken += 1;
        }
    }
    assert!(taken > 0 && held > 0, "taken {taken}, held back {held}");
    ledger.record(&during);

    // Back (without the hook): the change is finished, and every keyed
    // call, sent again, applies once.
    cluster.restart_shard(1, address);
    runtime.block_on(support::wait_until(
        "the change to be finished",
        support::PATIENCE,
        || {
            let log = cluster.coordinator.log();
            std::future::ready(
                if log.contains("keyed increments moved to this membership: every node open to it")
                    && log.matches("every node open to it").count() >= 2
                {
                    Ok(())
                } else {
                    Err(())
                },
            )
        },
    ));
    runtime.block_on(async {
        for item in before.iter().chain(&during) {
            connections
                .send_until_acknowledged(
                    &support::ledger::Clients::new(vec![endpoint.clone()]),
                    std::slice::from_ref(item),
                )
                .await;
        }
    });
    let totals = runtime.block_on(support::totals(&endpoint, std::slice::from_ref(&counter)));
    let outcome = ledger.against(totals);
    support::report(&format!(
        "a node crashed between its seal and its open ({taken} keys taken meanwhile, {held} held \
         back): {outcome}"
    ));
    assert_eq!((outcome.lost, outcome.duplicated), (0, 0), "{outcome}");
}
