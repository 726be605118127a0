//! What the coordinator's and the shard nodes' gRPC servers answer besides
//! their own services, on a real in-process cluster: reflection lists
//! exactly what each serves, and a method it does not serve is
//! `UNIMPLEMENTED` with a message that says where the API is.

use std::time::Duration;

use tally_cli::local_cluster::{LocalCluster, LocalClusterOptions};
use tally_proto::pb;
use tally_runtime::process::{COORDINATOR_API, SHARD_API};
use tonic::transport::Channel;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::ServerReflectionRequest;

const READY: Duration = Duration::from_secs(30);

async fn channel(endpoint: String) -> Channel {
    tonic::transport::Endpoint::from_shared(endpoint)
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// The server's reflection answer to one request.
async fn reflect(channel: Channel, request: MessageRequest) -> Option<MessageResponse> {
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    };
    ServerReflectionClient::new(channel)
        .server_reflection_info(futures::stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .unwrap()
        .message_response
}

/// The services `channel`'s server lists by reflection, sorted.
async fn listed_services(channel: Channel) -> Vec<String> {
    let answer = reflect(channel, MessageRequest::ListServices(String::new())).await;
    let Some(MessageResponse::ListServicesResponse(list)) = answer else {
        panic!("unexpected reflection answer: {answer:?}");
    };
    let mut names: Vec<String> = list
        .service
        .into_iter()
        .map(|service| service.name)
        .collect();
    names.sort();
    names
}

/// Whether reflection on `channel` describes `symbol`.
async fn describes(channel: Channel, symbol: &str) -> bool {
    matches!(
        reflect(
            channel,
            MessageRequest::FileContainingSymbol(symbol.to_string())
        )
        .await,
        Some(MessageResponse::FileDescriptorResponse(_))
    )
}

/// A unary call of `path` on `channel` (any message will do: no server
/// gets as far as decoding it).
async fn call(channel: Channel, path: &'static str) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    grpc.unary::<_, pb::IncrementResponse, _>(
        tonic::Request::new(pb::IncrementRequest::default()),
        tonic::codegen::http::uri::PathAndQuery::from_static(path),
        tonic_prost::ProstCodec::default(),
    )
    .await
    .expect_err(path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_server_lists_and_answers_only_what_it_serves() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(LocalClusterOptions::new(dir.path(), 1))
        .await
        .unwrap();
    cluster.wait_ready(READY).await.unwrap();
    let coordinator = channel(cluster.endpoint()).await;
    let shard_address = cluster.shard_configs().next().unwrap().listen;
    let shard = channel(format!("http://{shard_address}")).await;

    let common = [
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ];
    let mut expected: Vec<&str> = common.to_vec();
    expected.extend(["tally.v1.Admin", "tally.v1.Counter"]);
    expected.sort();
    assert_eq!(listed_services(coordinator.clone()).await, expected);
    let mut expected: Vec<&str> = common.to_vec();
    expected.push("tally.v1.Shard");
    expected.sort();
    assert_eq!(listed_services(shard.clone()).await, expected);
    // Whatever is listed can be described, health included.
    for channel in [&coordinator, &shard] {
        assert!(describes(channel.clone(), "grpc.health.v1.Health").await);
        assert!(describes(channel.clone(), "grpc.reflection.v1alpha.ServerReflection").await);
    }

    for (channel, path, message) in [
        (
            &coordinator,
            "/tally.v1.Shard/Apply",
            COORDINATOR_API.unimplemented,
        ),
        (
            &coordinator,
            "/tally.v1.Counter/NoSuchMethod",
            COORDINATOR_API.unimplemented,
        ),
        (
            &coordinator,
            "/tally.v1.Admin/NoSuchMethod",
            COORDINATOR_API.unimplemented,
        ),
        (
            &coordinator,
            "/no.such.Service/Call",
            COORDINATOR_API.unimplemented,
        ),
        (
            &shard,
            "/tally.v1.Counter/Increment",
            SHARD_API.unimplemented,
        ),
        (
            &shard,
            "/tally.v1.Shard/NoSuchMethod",
            SHARD_API.unimplemented,
        ),
        (
            &shard,
            "/grpc.health.v1.Health/NoSuchMethod",
            SHARD_API.unimplemented,
        ),
    ] {
        let status = call(channel.clone(), path).await;
        assert_eq!(
            status.code(),
            tonic::Code::Unimplemented,
            "{path}: {status:?}"
        );
        assert_eq!(status.message(), message, "{path}");
    }
    assert!(COORDINATOR_API
        .unimplemented
        .starts_with("tally coordinator: no such method"));
    assert!(SHARD_API
        .unimplemented
        .starts_with("tally shard node: no such method"));

    // The served methods still answer as before.
    let mut counter = cluster.counter_client().await.unwrap();
    counter
        .increment(pb::IncrementRequest {
            counter: "served".into(),
            delta: 2,
            idempotency_key: String::new(),
            ..Default::default()
        })
        .await
        .unwrap();
    let value = counter
        .get(pb::GetRequest {
            counter: "served".into(),
            allow_partial: false,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .value;
    assert_eq!(value, 2);
    cluster.shutdown().await.unwrap();
}
