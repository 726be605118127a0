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
                ..Default::default()
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
                ..Default::default()
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
                ..Default::default()
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
            ..Default::default()
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
                ..Default::default()
            })
            .await;
        assert!(delete.is_err(), "a plaintext Delete was answered");
    }

    // The path decides the role: spellings of Delete and Drain that a
    // lax router might take for them, with a read token, are refused.
    let delete = pb::DeleteRequest {
        counter: "likes".into(),
        ..Default::default()
    };
    for path in [
        "/tally.v1.Counter/Delete/",
        "//tally.v1.Counter/Delete",
        "/tally.v1.Counter//Delete",
        "/./tally.v1.Counter/Delete",
        "/tally.v1.counter/Delete",
        "/tally.v1.Counter/%44elete",
        "/tally.v1.Counter/Get/../Delete",
        "/grpc.health.v1.Health/../tally.v1.Counter/Delete",
        "/grpc.health.v1.Health/../tally.v1.Admin/Drain",
        "/grpc.reflection.v1.ServerReflection/../../tally.v1.Admin/Drain",
    ] {
        let channel = cluster
            .access(Some(&cluster.reader))
            .connect()
            .await
            .unwrap();
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await.unwrap();
        let answer: Result<tonic::Response<pb::DeleteResponse>, tonic::Status> = grpc
            .unary(
                tonic::Request::new(delete.clone()),
                tonic::codegen::http::uri::PathAndQuery::from_static(path),
                tonic_prost::ProstCodec::default(),
            )
            .await;
        let code = answer.map(drop).map_err(|status| status.code());
        assert!(
            matches!(
                code,
                Err(tonic::Code::PermissionDenied | tonic::Code::Unimplemented)
            ),
            "{path} with a read token: {code:?}"
        );
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
            ..Default::default()
        })
        .await
        .expect("the admin token deletes");
    assert_eq!(cluster.totals(&["likes"]).await[0].1, 0);
}

/// Sends `signal` to `daemon` without waiting for anything.
fn send(daemon: &Daemon, signal: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(daemon.pid() as i32), signal).unwrap();
}

/// The certificate the server at `address` presents to a TLS client
/// trusting `ca` (and presenting `identity`, a cluster certificate, where
/// the server asks for one).
async fn served_certificate(address: SocketAddr, ca: &Path, identity: Option<&str>) -> Vec<u8> {
    let config = match identity {
        Some(name) => TlsFiles {
            cert: ca.with_file_name(format!("{name}.crt")),
            key: ca.with_file_name(format!("{name}.key")),
            ca: ca.to_path_buf(),
        }
        .client_config()
        .unwrap(),
        None => client_config_trusting(ca).unwrap(),
    };
    let tcp = tokio::net::TcpStream::connect(address).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let stream = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    stream.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// `GET /metrics` over TLS trusting `ca`: the status line and the body.
async fn scrape_over_tls(address: SocketAddr, ca: &Path) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut config = client_config_trusting(ca).unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(address).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut stream = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: tally\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response).await;
    let response = String::from_utf8_lossy(&response).to_string();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_served_over_tls_only() {
    let cluster = SecureCluster::start();
    for daemon in std::iter::once(&cluster.coordinator).chain(&cluster.shards) {
        let address = daemon.metrics.expect("config/secure serves metrics");
        let (status, body) = scrape_over_tls(address, &cluster.ca()).await;
        assert!(
            status.starts_with("HTTP/1.1 200"),
            "{}: {status}",
            daemon.name
        );
        assert!(body.contains("tally_build_info"), "{}", daemon.name);
        // Plaintext HTTP gets no page.
        use std::io::{Read, Write};
        let mut plain = std::net::TcpStream::connect(address).unwrap();
        plain.set_read_timeout(Some(TIMEOUT)).unwrap();
        let _ = plain.write_all(b"GET /metrics HTTP/1.1\r\nHost: tally\r\n\r\n");
        let mut answer = Vec::new();
        let _ = plain.read_to_end(&mut answer);
        assert!(
            !String::from_utf8_lossy(&answer).contains("tally_build_info"),
            "{} served metrics over plaintext",
            daemon.name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_certificates_are_read_again_on_sighup() {
    use nix::sys::signal::Signal;
    let cluster = SecureCluster::start();
    let get = |token: String| {
        let access = cluster.access(Some(&token));
        async move {
            CounterClient::new(access.connect().await.unwrap())
                .get(pb::GetRequest {
                    counter: "likes".into(),
                    allow_partial: false,
                    ..Default::default()
                })
                .await
                .map(drop)
                .map_err(|status| status.code())
        }
    };

    // A token added to the file is taken at the next SIGHUP, not before.
    let tokens_file = cluster.config_dir().join("tokens.toml");
    let late = tallyctl(&[
        "tokens",
        "create",
        "--tokens-file",
        tokens_file.to_str().unwrap(),
        "--name",
        "late",
        "--role",
        "read",
    ])
    .trim()
    .to_string();
    assert_eq!(get(late.clone()).await, Err(tonic::Code::Unauthenticated));
    send(&cluster.coordinator, Signal::SIGHUP);
    support::wait_until("the new token is taken", support::PATIENCE, || {
        get(late.clone())
    })
    .await;

    // A broken file is refused, logged, and the tokens in use stay.
    let good_tokens = std::fs::read(&tokens_file).unwrap();
    std::fs::write(&tokens_file, "[[tokens]]\nname = \"x\"\n").unwrap();
    send(&cluster.coordinator, Signal::SIGHUP);
    support::wait_until(
        "the refused reload is logged",
        support::PATIENCE,
        || async {
            let log = cluster.coordinator.log();
            if log.contains("tls and tokens reload refused") {
                Ok(())
            } else {
                Err(log.lines().last().unwrap_or_default().to_string())
            }
        },
    )
    .await;
    assert_eq!(get(late.clone()).await, Ok(()));
    assert_eq!(get(cluster.admin.clone()).await, Ok(()));
    // (A reload is all or nothing: with the file broken, renewed
    // certificates would not be taken either.)
    std::fs::write(&tokens_file, good_tokens).unwrap();

    // Renewed certificates are served to new connections after SIGHUP,
    // and the coordinator reaches the shards with its renewed one.
    let certs = cluster.certs();
    let ca = cluster.ca();
    for (index, daemon) in std::iter::once(&cluster.coordinator)
        .chain(&cluster.shards)
        .enumerate()
    {
        let name = if index == 0 {
            "coordinator".to_string()
        } else {
            format!("shard-{index}")
        };
        let before = served_certificate(daemon.address, &ca, Some("coordinator")).await;
        tallyctl(&[
            "certs",
            "create-node",
            "--certs-dir",
            certs.to_str().unwrap(),
            "--overwrite",
            &name,
        ]);
        let renewed = tally::runtime::tls::read_certificates(&certs.join(format!("{name}.crt")))
            .unwrap()[0]
            .to_vec();
        assert_ne!(before, renewed, "{name}: a new certificate");
        send(daemon, Signal::SIGHUP);
        support::wait_until(
            &format!("{name} serves its renewed certificate"),
            support::PATIENCE,
            || async {
                if served_certificate(daemon.address, &ca, Some("coordinator")).await == renewed {
                    Ok(())
                } else {
                    Err("the old one")
                }
            },
        )
        .await;
    }
    let mut writer = cluster.counter(Some(&cluster.writer)).await;
    for counter in ["likes", "views", "quota"] {
        writer
            .increment(pb::IncrementRequest {
                counter: counter.into(),
                delta: 1,
                idempotency_key: String::new(),
                ..Default::default()
            })
            .await
            .expect("the renewed certificates connect the cluster");
    }
}

#[test]
fn a_bad_tls_or_tokens_file_stops_the_start_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/secure");
    for file in ["coordinator.toml", "shard-1.toml"] {
        std::fs::copy(shipped.join(file), dir.path().join(file)).unwrap();
    }
    let start = |binary: &str, config: &str, extra: &[&str]| {
        let config = dir.path().join(config);
        let mut args = vec![
            "--config",
            config.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ];
        args.extend_from_slice(extra);
        let output = run_to_end(binary, &args);
        assert!(!output.status.success(), "{binary} started");
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        stderr
    };
    let data = dir.path().join("data");
    let data_args = ["--data-dir", data.to_str().unwrap()];

    // No certificates made yet: the file and the key are named.
    let error = start("tally-shard", "shard-1.toml", &data_args);
    assert!(
        error.contains("shard-1.toml: tls.cert: ") && error.contains("cannot read"),
        "{error}"
    );
    let certs = dir.path().join("certs");
    let certs = certs.to_str().unwrap();
    tallyctl(&["certs", "create-ca", "--certs-dir", certs]);
    for node in ["coordinator", "shard-1", "shard-2"] {
        tallyctl(&["certs", "create-node", "--certs-dir", certs, node]);
    }
    // A key that is not the certificate's.
    let error = start(
        "tally-shard",
        "shard-1.toml",
        &[
            "--data-dir",
            data.to_str().unwrap(),
            "--tls-cert",
            &format!("{certs}/shard-1.crt"),
            "--tls-key",
            &format!("{certs}/shard-2.key"),
            "--tls-ca",
            &format!("{certs}/ca.crt"),
        ],
    );
    assert!(error.contains("command line: tls: "), "{error}");
    // One flag overrides its key only: here a certificate that is not the
    // file's key's.
    let error = start(
        "tally-shard",
        "shard-1.toml",
        &[
            "--data-dir",
            data.to_str().unwrap(),
            "--tls-cert",
            &format!("{certs}/shard-2.crt"),
        ],
    );
    assert!(error.contains("command line: tls: "), "{error}");
    // Only some of the three keys.
    let plain = std::fs::read_to_string(dir.path().join("shard-1.toml")).unwrap();
    let plain = plain.split("\n[tls]\n").next().unwrap().to_string();
    std::fs::write(dir.path().join("plain-shard-1.toml"), plain).unwrap();
    let error = start(
        "tally-shard",
        "plain-shard-1.toml",
        &[
            "--data-dir",
            data.to_str().unwrap(),
            "--tls-cert",
            &format!("{certs}/shard-1.crt"),
        ],
    );
    assert!(
        error.contains("command line: tls.key: is required"),
        "{error}"
    );
    // The coordinator: no tokens file, then a bad one.
    let error = start("tally-coordinator", "coordinator.toml", &[]);
    assert!(
        error.contains("coordinator.toml: tokens_file: ") && error.contains("cannot read"),
        "{error}"
    );
    std::fs::write(
        dir.path().join("tokens.toml"),
        "[[tokens]]\nname = \"a\"\nrole = \"admin\"\nsha256 = \"beef\"\n",
    )
    .unwrap();
    let error = start("tally-coordinator", "coordinator.toml", &[]);
    assert!(
        error.contains("tokens[0].sha256: is not 64 hex digits"),
        "{error}"
    );
}

#[test]
fn tallyctl_dev_secure_prints_how_to_call_it_and_that_works() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("dev-data");
    let mut child = std::process::Command::new(support::binary("tallyctl"))
        .args([
            "dev",
            "--secure",
            "--port",
            "0",
            "--data-dir",
            data_dir.to_str().unwrap(),
        ])
        .current_dir(dir.path())
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut exports = Vec::new();
    let mut command = None;
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(export) = line.trim().strip_prefix("export ") {
            let assignment = export.split_whitespace().next().unwrap();
            let (name, value) = assignment.split_once('=').unwrap();
            exports.push((name.to_string(), value.to_string()));
        }
        if line.contains(" get page:views") {
            command = Some(line.trim().to_string());
        }
        if line.starts_with("Ctrl-C stops the cluster") {
            break;
        }
    }
    let names: Vec<&str> = exports.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names, ["TALLY_CA_CERT", "TALLY_TOKEN"]);
    // `cargo tallyctl --endpoint https://... get page:views`, as printed,
    // with the printed exports, from the directory it ran in.
    let command = command.expect("the banner shows a get");
    let args: Vec<&str> = command
        .strip_prefix("cargo tallyctl ")
        .expect("a cargo tallyctl command")
        .split_whitespace()
        .collect();
    assert!(args[1].starts_with("https://"), "{command}");
    let run = |env: &[(String, String)]| {
        let mut run = assert_cmd::Command::new(support::binary("tallyctl"));
        run.args(&args)
            .current_dir(dir.path())
            .timeout(support::START_TIMEOUT);
        for (name, value) in env {
            run.env(name, value);
        }
        run.output().unwrap()
    };
    let output = run(&exports);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("page:views"));
    // Without the token: refused.
    let output = run(&exports[..1]);
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("UNAUTHENTICATED"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = wait_timeout::ChildExt::wait_timeout(&mut child, support::START_TIMEOUT)
        .unwrap()
        .expect("tallyctl dev exits after SIGINT");
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_that_connect_and_say_nothing_lose_their_connections() {
    let cluster = SecureCluster::start();
    let address = cluster.coordinator.address;
    let config = std::sync::Arc::new(client_config_trusting(&cluster.ca()).unwrap());
    // Every connection slot of the public port, held by peers that finish
    // the TLS handshake (no token is needed for that) and then say
    // nothing, and as many again that do not even start a handshake.
    let mut silent = Vec::new();
    for _ in 0..tally::runtime::edge::MAX_CONNECTIONS_PER_SERVER {
        let tcp = tokio::net::TcpStream::connect(address).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let connected = tokio_rustls::TlsConnector::from(config.clone())
            .connect(name, tcp)
            .await;
        silent.push(connected.expect("a handshake within the cap"));
    }
    let mut silent_tcp = Vec::new();
    for _ in 0..tally::runtime::edge::MAX_CONNECTIONS_PER_SERVER {
        silent_tcp.push(tokio::net::TcpStream::connect(address).await.unwrap());
    }
    // A real client is served once the server has closed the silent ones
    // (FIRST_BYTES_TIMEOUT, then HANDSHAKE_TIMEOUT for the rest), not after
    // their connections' whole life.
    let started = std::time::Instant::now();
    let mut access = cluster.access(Some(&cluster.reader));
    access.timeout = Duration::from_secs(60);
    let answer = CounterClient::new(access.connect().await.unwrap())
        .get(pb::GetRequest {
            counter: "likes".into(),
            allow_partial: false,
            ..Default::default()
        })
        .await;
    assert!(answer.is_ok(), "{answer:?}");
    let waited = started.elapsed();
    let bound = tally::runtime::tls::FIRST_BYTES_TIMEOUT
        + tally::runtime::tls::HANDSHAKE_TIMEOUT
        + Duration::from_secs(15);
    assert!(waited < bound, "served after {waited:?}");
    // The silent TLS peers were closed by the server (after its own
    // HTTP/2 settings, which it sends at once).
    use tokio::io::AsyncReadExt;
    let mut received = Vec::new();
    let closed = tokio::time::timeout(TIMEOUT, silent[0].read_to_end(&mut received)).await;
    assert!(closed.is_ok(), "a silent connection is still open");
}
