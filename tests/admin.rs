//! The operator's side of an in-process cluster: the Admin service's ring,
//! placement and status; health and reflection on the coordinator's and
//! every shard's port; and the bench, which checks its own work.

mod support;

use std::time::Duration;

use support::cluster::{increment, start, value};
use tally::cli::local_cluster::LocalCluster;
use tally::proto::pb;

#[tokio::test]
async fn admin_reports_ring_placement_and_status() {
    let test = start().await;
    let mut admin = test.cluster.admin_client().await.unwrap();
    let mut client = test.cluster.counter_client().await.unwrap();

    let ring = admin.ring(pb::RingRequest {}).await.unwrap().into_inner();
    assert_eq!(ring.stripes, 8);
    let ids: Vec<&str> = ring.nodes.iter().map(|node| node.id.as_str()).collect();
    assert_eq!(ids, vec!["shard-1", "shard-2", "shard-3"]);
    let owned: f64 = ring.nodes.iter().map(|node| node.owned_fraction).sum();
    assert!((owned - 1.0).abs() < 1e-9);
    for node in &ring.nodes {
        assert_eq!(node.vnodes, 4096);
        assert!((node.owned_fraction - 1.0 / 3.0).abs() < 0.03, "{node:?}");
    }

    let located = admin
        .locate(pb::LocateRequest {
            counter: "page:views".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(located.stripes.len(), 8);
    let expected_ring = test.cluster.coordinator_config().ring().unwrap();
    for stripe in &located.stripes {
        let owner = expected_ring.owner("page:views", stripe.stripe);
        assert_eq!(stripe.node_id, expected_ring.nodes()[owner].id);
        assert_eq!(
            stripe.hash,
            tally::ring::key_hash("page:views", stripe.stripe)
        );
    }

    for _ in 0..16 {
        client
            .increment(increment("page:views", 1, ""))
            .await
            .unwrap();
    }
    let status = admin
        .cluster_status(pb::ClusterStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.nodes.len(), 3);
    // 16 increments rotate over the 8 stripes (per coordinator thread), so
    // between 2 and 8 entries exist; their count is what status reports.
    let entries: u64 = status.nodes.iter().map(|node| node.entries).sum();
    assert!((2..=8).contains(&entries), "{entries} entries");
    for node in &status.nodes {
        assert!(node.reachable, "{node:?}");
        assert_eq!(node.durability, "sync");
        assert!(node.last_flush_unix_ms > 0, "{node:?}");
    }
    test.cluster.shutdown().await.unwrap();
}

#[tokio::test]
async fn health_and_reflection_on_coordinator_and_shard_ports() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let test = start().await;
    let mut endpoints = vec![(test.cluster.endpoint(), "tally.v1.Counter")];
    for shard in test.cluster.shard_configs() {
        endpoints.push((format!("http://{}", shard.listen), "tally.v1.Shard"));
    }
    for (endpoint, service) in endpoints {
        let channel = tonic::transport::Endpoint::from_shared(endpoint.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
        let answer = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.to_string(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            answer.status(),
            tonic_health::pb::health_check_response::ServingStatus::Serving
        );

        let mut reflection = ServerReflectionClient::new(channel);
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut answers = reflection
            .server_reflection_info(futures::stream::iter(vec![request]))
            .await
            .unwrap()
            .into_inner();
        let answer = answers.message().await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
            panic!("unexpected reflection answer from {endpoint}");
        };
        let names: Vec<String> = list
            .service
            .into_iter()
            .map(|service| service.name)
            .collect();
        assert!(
            names.iter().any(|name| name == service),
            "{endpoint}: {names:?}"
        );
    }
    test.cluster.shutdown().await.unwrap();
}

fn bench_options(cluster: &LocalCluster, prefix: &str) -> tally::cli::bench::BenchOptions {
    tally::cli::bench::BenchOptions {
        access: tally::cli::client::Access::plain(cluster.endpoint(), Duration::from_secs(5)),
        clients: 16,
        connections: 4,
        stop: tally::cli::bench::Stop::Calls(400),
        counters: 50,
        batch: 5,
        read_percent: 20,
        keyed: false,
        prefix: prefix.into(),
        timeout: Duration::from_secs(10),
        check: true,
        progress: false,
    }
}

#[tokio::test]
async fn bench_counts_and_checks_its_own_work() {
    let test = start().await;
    let report = tally::cli::bench::run(bench_options(&test.cluster, "b1-"))
        .await
        .unwrap();
    assert_eq!(report.check, "ok", "{report:?}");
    assert_eq!(report.calls, 400);
    assert_eq!(report.errors, 0, "{:?}", report.first_errors);
    let reads = report.read_latency_us.as_ref().map_or(0, |l| l.count);
    let writes = report.write_latency_us.as_ref().map_or(0, |l| l.count);
    assert_eq!(reads + writes, 400);
    assert_eq!(report.increments, writes * 5);
    assert_eq!(report.checked_counters, 50);
    // The counters hold exactly what the bench acknowledged.
    let mut client = test.cluster.counter_client().await.unwrap();
    let mut total = 0;
    for counter in 0..50 {
        total += value(&mut client, &format!("b1-{counter}")).await;
    }
    assert_eq!(total as u64, report.increments);

    // A counter changed behind the bench's back fails its check.
    client.increment(increment("b2-7", 3, "")).await.unwrap();
    let report = tally::cli::bench::run(bench_options(&test.cluster, "b2-"))
        .await
        .unwrap();
    assert!(!report.passed());
    assert!(
        report.check.contains("b2-7") && report.check.contains("3 extra"),
        "{}",
        report.check
    );
    test.cluster.shutdown().await.unwrap();
}
