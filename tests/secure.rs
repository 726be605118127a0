//! The shipped secure configuration (`config/secure/`) against an attacker.
//!
//! Real processes run the files of `config/secure/` as shipped (only their
//! ports, data directories and shard addresses are changed, to free ports
//! in a temporary directory), with certificates and tokens made by the real
//! `tallyctl certs` and `tallyctl tokens`. Every unauthenticated call that
//! damaged a plaintext cluster is replayed: by a plaintext client, a TLS
//! client without a certificate, one with a self-signed certificate, one
//! with a certificate of another CA, and a `read` and a `write` token where
//! the public port is the door. Each is refused, and afterwards every total
//! is what it was and every node still serves. The same calls made with
//! the right credentials succeed, so a refusal is the credentials', not a
//! broken call's.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use support::{run_to_end, Daemon};
use tally::cli::client::{Access, Client};
use tally::proto::pb;
use tally::proto::pb::admin_client::AdminClient;
use tally::proto::pb::counter_client::CounterClient;
use tally::proto::pb::shard_client::ShardClient;
use tally::runtime::tls::{client_config_trusting, Connector, TlsFiles};
use tonic::transport::{Channel, Endpoint};

const TIMEOUT: Duration = Duration::from_secs(10);

/// `tallyctl ARGS`, which must succeed; its standard output.
fn tallyctl(args: &[&str]) -> String {
    let output = run_to_end("tallyctl", args);
    assert!(
        output.status.success(),
        "tallyctl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// A cluster running `config/secure/`.
struct SecureCluster {
    dir: tempfile::TempDir,
    shards: Vec<Daemon>,
    coordinator: Daemon,
    admin: String,
    writer: String,
    reader: String,
}

impl SecureCluster {
    fn config_dir(&self) -> PathBuf {
        self.dir.path().join("secure")
    }

    fn certs(&self) -> PathBuf {
        self.config_dir().join("certs")
    }

    fn ca(&self) -> PathBuf {
        self.certs().join("ca.crt")
    }

    fn start() -> SecureCluster {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("secure");
        std::fs::create_dir_all(&config).unwrap();
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/secure");
        for file in [
            "coordinator.toml",
            "shard-1.toml",
            "shard-2.toml",
            "shard-3.toml",
        ] {
            std::fs::copy(shipped.join(file), config.join(file)).unwrap();
        }
        // What config/secure/setup.sh does, with the binaries under test.
        let certs = config.join("certs");
        let certs = certs.to_str().unwrap();
        tallyctl(&["certs", "create-ca", "--certs-dir", certs]);
        for node in ["coordinator", "shard-1", "shard-2", "shard-3"] {
            tallyctl(&["certs", "create-node", "--certs-dir", certs, node]);
        }
        let tokens = config.join("tokens.toml");
        let tokens = tokens.to_str().unwrap();
        let token = |name: &str, role: &str| {
            tallyctl(&[
                "tokens",
                "create",
                "--tokens-file",
                tokens,
                "--name",
                name,
                "--role",
                role,
            ])
            .trim()
            .to_string()
        };
        let (admin, writer, reader) = (
            token("admin", "admin"),
            token("ingest", "write"),
            token("dashboards", "read"),
        );

        let mut shards = Vec::new();
        let mut coordinator_file =
            std::fs::read_to_string(config.join("coordinator.toml")).unwrap();
        for index in 1..=3 {
            let file = config.join(format!("shard-{index}.toml"));
            let data = dir.path().join(format!("data/shard-{index}"));
            let shard = Daemon::start(
                "tally-shard",
                &format!("shard-{index}"),
                &[
                    "--config",
                    file.to_str().unwrap(),
                    "--listen",
                    "127.0.0.1:0",
                    "--metrics-listen",
                    "127.0.0.1:0",
                    "--data-dir",
                    data.to_str().unwrap(),
                ],
                dir.path(),
            );
            let shipped_address = format!("\"127.0.0.1:770{index}\"");
            assert!(coordinator_file.contains(&shipped_address));
            coordinator_file =
                coordinator_file.replace(&shipped_address, &format!("\"{}\"", shard.address));
            shards.push(shard);
        }
        std::fs::write(config.join("coordinator.toml"), coordinator_file).unwrap();
        let coordinator = Daemon::start(
            "tally-coordinator",
            "coordinator",
            &[
                "--config",
                config.join("coordinator.toml").to_str().unwrap(),
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
            ],
            dir.path(),
        );
        SecureCluster {
            dir,
            shards,
            coordinator,
            admin,
            writer,
            reader,
        }
    }

    fn access(&self, token: Option<&str>) -> Access {
        Access {
            endpoint: format!("https://{}", self.coordinator.address),
            ca_cert: Some(self.ca()),
            token: token.map(str::to_string),
            client_identity: None,
            timeout: TIMEOUT,
        }
    }

    async fn counter(&self, token: Option<&str>) -> CounterClient<Client> {
        CounterClient::new(self.access(token).connect().await.unwrap())
    }

    async fn admin_client(&self, token: Option<&str>) -> AdminClient<Client> {
        AdminClient::new(self.access(token).connect().await.unwrap())
    }

    /// Every counter's total, read with the admin token.
    async fn totals(&self, counters: &[&str]) -> Vec<(String, i64, bool)> {
        let answer = self
            .counter(Some(&self.admin))
            .await
            .get_batch(pb::GetBatchRequest {
                counters: counters.iter().map(|name| name.to_string()).collect(),
                allow_partial: false,
            })
            .await
            .expect("the admin reads every counter")
            .into_inner();
        answer
            .counters
            .into_iter()
            .map(|result| (result.counter, result.value, result.complete))
            .collect()
    }
}

/// Who calls a shard's port directly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Caller {
    /// No TLS at all.
    Plaintext,
    /// TLS, trusting the cluster's CA, presenting no certificate.
    NoCertificate,
    /// TLS, presenting a self-signed certificate.
    SelfSigned,
    /// TLS, presenting a node certificate of another CA.
    ForeignCa,
    /// TLS, presenting the coordinator's certificate: the control.
    Cluster,
}

const ATTACKERS: [Caller; 4] = [
    Caller::Plaintext,
    Caller::NoCertificate,
    Caller::SelfSigned,
    Caller::ForeignCa,
];

/// A client of shard `address` as `caller`, or the error of connecting.
async fn shard_client(
    cluster: &SecureCluster,
    foreign: &Path,
    address: SocketAddr,
    caller: Caller,
) -> Result<ShardClient<Channel>, String> {
    let endpoint = Endpoint::from_shared(format!("http://{address}"))
        .unwrap()
        .connect_timeout(TIMEOUT)
        .timeout(TIMEOUT);
    let identity = |dir: &Path, name: &str| TlsFiles {
        cert: dir.join(format!("{name}.crt")),
        key: dir.join(format!("{name}.key")),
        ca: cluster.ca(),
    };
    let config = match caller {
        Caller::Plaintext => {
            return endpoint
                .connect()
                .await
                .map(ShardClient::new)
                .map_err(|error| format!("{error:?}"))
        }
        Caller::NoCertificate => client_config_trusting(&cluster.ca()).unwrap(),
        // The foreign CA's own certificate is self-signed.
        Caller::SelfSigned => identity(foreign, "ca").client_config().unwrap(),
        Caller::ForeignCa => identity(foreign, "shard-1").client_config().unwrap(),
        Caller::Cluster => identity(&cluster.certs(), "coordinator")
            .client_config()
            .unwrap(),
    };
    let connector = Connector::fixed(config, &address.to_string()).unwrap();
    endpoint
        .connect_with_connector(connector)
        .await
        .map(ShardClient::new)
        .map_err(|error| format!("{error:?}"))
}

/// Every internal call that damaged a plaintext cluster, addressed to the
/// shard `node_id`; `Ok` for each call the shard answered.
async fn attack_shard(
    client: &mut ShardClient<Channel>,
    node_id: &str,
) -> Vec<(&'static str, Result<(), tonic::Code>)> {
    let mut outcomes = Vec::new();
    let apply = client
        .apply(pb::ApplyRequest {
            node_id: node_id.into(),
            increments: vec![pb::ShardIncrement {
                counter: "likes".into(),
                stripe: 4_000_000_000,
                delta: 1_000_000_000_000,
                ..Default::default()
            }],
            protocol_version: tally::proto::SHARD_PROTOCOL_VERSION,
        })
        .await;
    outcomes.push(("Apply", apply.map(drop).map_err(|status| status.code())));
    let erase = client
        .erase(pb::EraseRequest {
            node_id: node_id.into(),
            counters: vec!["likes".into(), "views".into()],
        })
        .await;
    outcomes.push(("Erase", erase.map(drop).map_err(|status| status.code())));
    let drop_copy = client
        .drop_copy(pb::DropCopyRequest {
            node_id: node_id.into(),
            origin: node_id.into(),
        })
        .await;
    outcomes.push((
        "DropCopy",
        drop_copy.map(drop).map_err(|status| status.code()),
    ));
    let drain = client
        .drain(pb::ShardDrainRequest {
            node_id: node_id.into(),
            phase: pb::DrainPhase::HandedOver as i32,
            adopter: "shard-x".into(),
            version: u64::MAX,
        })
        .await;
    outcomes.push(("Drain", drain.map(drop).map_err(|status| status.code())));
    let replicate = client
        .replicate(pb::ReplicateRequest {
            node_id: node_id.into(),
            origin: "shard-1".into(),
            version: u64::MAX / 2,
            full: true,
            entries: vec![pb::EntryValue {
                counter: "likes".into(),
                stripe: 0,
                value: 1_000_000_000_000_000,
            }],
            ..Default::default()
        })
        .await;
    outcomes.push((
        "Replicate",
        replicate.map(drop).map_err(|status| status.code()),
    ));
    let status = client.status(pb::ShardStatusRequest { brief: true }).await;
    outcomes.push(("Status", status.map(drop).map_err(|status| status.code())));
    outcomes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_attack_table_against_config_secure_changes_nothing() {
    let cluster = SecureCluster::start();
    let counters = ["likes", "views", "quota"];

    // Traffic with the write token, as an application sends it.
    let mut writer = cluster.counter(Some(&cluster.writer)).await;
    for (round, counter) in counters.iter().cycle().take(60).enumerate() {
        writer
            .increment(pb::IncrementRequest {
                counter: counter.to_string(),
                delta: round as i64 + 1,
                idempotency_key: String::new(),
            })
            .await
            .expect("the write token increments");
    }
    let before = cluster.totals(&counters).await;
    assert!(before
        .iter()
        .all(|(_, value, complete)| *value > 0 && *complete));

    // The public port: no token, a read token, a write token.
    let mut refused = Vec::new();
    for (who, token) in [
        ("no token", None),
        ("an unknown token", Some("tally_0000")),
        ("a read token", Some(cluster.reader.as_str())),
        ("a write token", Some(cluster.writer.as_str())),
    ] {
        let mut counter = cluster.counter(token).await;
        let delete = counter
            .delete(pb::DeleteRequest {
                counter: "likes".into(),
            })
            .await
            .map(drop)
            .map_err(|status| status.code());
        let drain = cluster
            .admin_client(token)
            .await
            .drain(pb::DrainRequest {
                node_id: "shard-2".into(),
            })
            .await
            .map(drop)
            .map_err(|status| status.code());
        let expected = if token.is_none() || token == Some("tally_0000") {
            tonic::Code::Unauthenticated
        } else {
            tonic::Code::PermissionDenied
        };
        assert_eq!(delete, Err(expected), "Delete with {who}");
        assert_eq!(drain, Err(expected), "Admin.Drain with {who}");
        refused.push(who);
    }
    // A read token cannot write either; nor can anyone over plaintext.
    let increment = cluster
        .counter(Some(&cluster.reader))
        .await
        .increment(pb::IncrementRequest {
            counter: "likes".into(),
            delta: 1_000_000,
            idempotency_key: String::new(),
        })
        .await
        .map_err(|status| status.code());
    assert_eq!(increment.map(drop), Err(tonic::Code::PermissionDenied));
    let plaintext = CounterClient::connect(format!("http://{}", cluster.coordinator.address))
        .await
        .map_err(|error| format!("{error:?}"));
    if let Ok(mut plaintext) = plaintext {
        let delete = plaintext
            .delete(pb::DeleteRequest {
                counter: "likes".into(),
            })
            .await;
        assert!(delete.is_err(), "a plaintext Delete was answered");
    }

    // The shards' port: every attacker is refused at the handshake.
    let foreign = cluster.dir.path().join("foreign");
    let foreign_dir = foreign.to_str().unwrap();
    tallyctl(&["certs", "create-ca", "--certs-dir", foreign_dir]);
    tallyctl(&[
        "certs",
        "create-node",
        "--certs-dir",
        foreign_dir,
        "shard-1",
    ]);
    for (index, shard) in cluster.shards.iter().enumerate() {
        let node_id = format!("shard-{}", index + 1);
        for caller in ATTACKERS {
            let outcomes = match shard_client(&cluster, &foreign, shard.address, caller).await {
                Err(_) => continue, // refused before any call
                Ok(mut client) => attack_shard(&mut client, &node_id).await,
            };
            for (call, outcome) in outcomes {
                assert!(
                    outcome.is_err(),
                    "{caller:?} called {call} on {node_id} and was answered"
                );
            }
        }
    }
    // The control: a cluster certificate reaches a shard (its status; no
    // damage done), so the refusals above are the credentials'.
    let mut control = shard_client(
        &cluster,
        &foreign,
        cluster.shards[0].address,
        Caller::Cluster,
    )
    .await
    .expect("the coordinator's certificate is the cluster's");
    let status = control
        .status(pb::ShardStatusRequest { brief: true })
        .await
        .expect("a cluster certificate is served")
        .into_inner();
    assert_eq!(status.node_id, "shard-1");

    // Nothing changed, every node serves, and the admin token can do what
    // the others could not.
    assert_eq!(cluster.totals(&counters).await, before);
    let status = cluster
        .admin_client(Some(&cluster.admin))
        .await
        .cluster_status(pb::ClusterStatusRequest {})
        .await
        .expect("the admin token reads the cluster's status")
        .into_inner();
    assert!(status.nodes.iter().all(|node| node.reachable), "{status:?}");
    cluster
        .counter(Some(&cluster.admin))
        .await
        .delete(pb::DeleteRequest {
            counter: "likes".into(),
        })
        .await
        .expect("the admin token deletes");
    assert_eq!(cluster.totals(&["likes"]).await[0].1, 0);
}
