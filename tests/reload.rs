//! Reloading the coordinator's membership (in process, no servers): what
//! would move keys or drop counts is refused, adding a node is accepted.

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
