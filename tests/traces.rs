//! Traces across the hop: with `otlp_endpoint` set, a public call's span,
//! the coordinator's internal call and the shard's handling of it (for an
//! increment, down to its wait for the group commit) reach an OTLP
//! collector as one trace, each the parent of the next. The collector here is a real OTLP/gRPC server in the
//! test, the daemons real processes.

mod support;

use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use tally::proto::pb;
use tally::proto::pb::counter_client::CounterClient;

/// Every export it receives.
#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<ExportTraceServiceRequest>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// One exported span: service, name, trace id, span id, parent span id.
#[derive(Debug, Clone)]
struct Exported {
    service: String,
    name: String,
    trace: Vec<u8>,
    id: Vec<u8>,
    parent: Vec<u8>,
    /// String attributes, `(key, value)`.
    attributes: Vec<(String, String)>,
}

impl Collector {
    fn spans(&self) -> Vec<Exported> {
        let mut spans = Vec::new();
        for export in self.0.lock().unwrap().iter() {
            for resource_spans in &export.resource_spans {
                let service = resource_spans
                    .resource
                    .iter()
                    .flat_map(|resource| &resource.attributes)
                    .find(|attribute| attribute.key == "service.name")
                    .and_then(|attribute| attribute.value.as_ref()?.value.clone())
                    .map(|value| match value {
                        Value::StringValue(name) => name,
                        other => format!("{other:?}"),
                    })
                    .unwrap_or_default();
                for scope in &resource_spans.scope_spans {
                    for span in &scope.spans {
                        spans.push(Exported {
                            service: service.clone(),
                            name: span.name.clone(),
                            trace: span.trace_id.clone(),
                            id: span.span_id.clone(),
                            parent: span.parent_span_id.clone(),
                            attributes: span
                                .attributes
                                .iter()
                                .filter_map(|attribute| {
                                    match attribute.value.as_ref()?.value.as_ref()? {
                                        Value::StringValue(value) => {
                                            Some((attribute.key.clone(), value.clone()))
                                        }
                                        _ => None,
                                    }
                                })
                                .collect(),
                        });
                    }
                }
            }
        }
        spans
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_public_call_is_one_trace_down_to_the_shard() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let collector_url = format!("http://{}", listener.local_addr().unwrap());
    let collector = Collector::default();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tally_runtime::tls::incoming(
                listener,
                None,
                tally_runtime::edge::MAX_CONNECTIONS_PER_SERVER,
            )),
    );

    let dir = tempfile::tempdir().unwrap();
    let shard_config = support::write_shard_config(dir.path(), 1, "sync");
    let mut shard = support::start_shard(
        "shard-1",
        &shard_config,
        &["--otlp-endpoint", &collector_url],
    );
    let coordinator_config = support::write_coordinator_config(dir.path(), &[shard.address]);
    let mut coordinator = support::Daemon::start(
        "tally-coordinator",
        "coordinator",
        &[
            "--config",
            coordinator_config.to_str().unwrap(),
            "--otlp-endpoint",
            &collector_url,
        ],
        dir.path(),
    );
    let mut client = CounterClient::connect(coordinator.endpoint())
        .await
        .unwrap();
    client
        .increment(pb::IncrementRequest {
            counter: "traced".into(),
            delta: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    client
        .get(pb::GetRequest {
            counter: "traced".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    client
        .delete(pb::DeleteRequest {
            counter: "traced".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    drop(client);
    // A clean stop exports what is buffered. Waited for off the runtime
    // that serves the collector.
    tokio::task::spawn_blocking(move || {
        assert!(coordinator
            .signal(nix::sys::signal::Signal::SIGTERM)
            .success());
        assert!(shard.signal(nix::sys::signal::Signal::SIGTERM).success());
    })
    .await
    .unwrap();

    let spans = support::wait_until("the spans of the call", support::PATIENCE, || async {
        let spans = collector.spans();
        let find = |service: &str, name: &str| {
            spans
                .iter()
                .find(|span| span.service == service && span.name == name)
                .cloned()
        };
        let wanted = [
            ("tally-coordinator", "Increment"),
            ("tally-coordinator", "Apply"),
            ("tally-shard", "Apply"),
            ("tally-shard", "group commit wait"),
            ("tally-coordinator", "Get"),
            ("tally-coordinator", "Read"),
            ("tally-shard", "Read"),
            ("tally-coordinator", "Delete"),
            ("tally-shard", "Erase"),
        ];
        let found: Vec<Exported> = wanted
            .iter()
            .filter_map(|(service, name)| find(service, name))
            .collect();
        if found.len() == wanted.len() {
            Ok(found)
        } else {
            Err(spans
                .iter()
                .map(|span| format!("{}:{}", span.service, span.name))
                .collect::<Vec<_>>())
        }
    })
    .await;
    // The public calls name their counter.
    for call in [&spans[0], &spans[4], &spans[7]] {
        assert!(
            call.attributes
                .contains(&("counter".to_string(), "traced".to_string())),
            "{call:?}"
        );
    }
    // Each chain, parent to child, in one trace.
    let chains: [&[usize]; 3] = [&[0, 1, 2, 3], &[4, 5, 6], &[7, 8]];
    for chain in chains {
        for pair in chain.windows(2) {
            let (parent, child) = (&spans[pair[0]], &spans[pair[1]]);
            assert_eq!(
                child.trace, parent.trace,
                "{child:?} in the trace of {parent:?}"
            );
            assert_eq!(child.parent, parent.id, "{child:?} a child of {parent:?}");
        }
    }
}
