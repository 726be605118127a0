//! Benchmarks for the consistent-hash ring in `tally-ring`.
//!
//! Measures the pieces that sit on the increment hot path and the cost of a
//! membership change:
//!
//! - `ring/owner`: looking up the owner of a `(counter, stripe)` pair (key hash
//!   plus binary search) on rings of 3 and 6 equal nodes with the default
//!   virtual-node count;
//! - `ring/key_hash`: hashing counter names of 16 and 256 bytes;
//! - `ring/build`: building a 3-node ring with the default virtual-node count,
//!   which is what every membership change pays.
//!
//! Run with `cargo bench --bench ring` from the workspace root; add a filter
//! such as `cargo bench --bench ring -- ring/owner` to run one group.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use tally_ring::{key_hash, NodeSpec, Ring, DEFAULT_VNODES_PER_WEIGHT};

/// Distinct counters cycled through by the lookup benchmark, so the branch
/// predictor cannot learn a single search path.
const LOOKUP_COUNTERS: usize = 1024;
const STRIPES: u32 = 8;

fn equal_nodes(count: usize) -> Vec<NodeSpec> {
    (0..count)
        .map(|number| NodeSpec {
            id: format!("shard-{number}.tally.internal:7070"),
            weight: 1,
        })
        .collect()
}

fn counter_name(length: usize) -> String {
    "requests/http/".chars().cycle().take(length).collect()
}

fn bench_owner(criterion: &mut Criterion) {
    // Names are built up front so the measurement covers hashing and lookup,
    // not string formatting.
    let keys: Vec<(String, u32)> = (0..LOOKUP_COUNTERS)
        .map(|number| {
            let stripe = u32::try_from(number).expect("small") % STRIPES;
            (format!("tenant-{}/counter-{number}", number % 17), stripe)
        })
        .collect();

    let mut group = criterion.benchmark_group("ring/owner");
    for node_count in [3, 6] {
        let ring = Ring::new(&equal_nodes(node_count), DEFAULT_VNODES_PER_WEIGHT)
            .expect("valid membership");
        group.bench_with_input(
            BenchmarkId::from_parameter(format!("{node_count}_nodes")),
            &ring,
            |bencher, ring| {
                let mut next_key = keys.iter().cycle();
                bencher.iter(|| {
                    let (counter, stripe) = next_key.next().expect("cycle never ends");
                    ring.owner(black_box(counter), black_box(*stripe))
                });
            },
        );
    }
    group.finish();
}

fn bench_key_hash(criterion: &mut Criterion) {
    let mut group = criterion.benchmark_group("ring/key_hash");
    for length in [16, 256] {
        let counter = counter_name(length);
        group.bench_with_input(
            BenchmarkId::from_parameter(format!("{length}_bytes")),
            &counter,
            |bencher, counter| bencher.iter(|| key_hash(black_box(counter), black_box(3))),
        );
    }
    group.finish();
}

fn bench_build(criterion: &mut Criterion) {
    let nodes = equal_nodes(3);
    let mut group = criterion.benchmark_group("ring/build");
    group.bench_function("3_nodes", |bencher| {
        bencher.iter(|| {
            Ring::new(black_box(&nodes), black_box(DEFAULT_VNODES_PER_WEIGHT))
                .expect("valid membership")
        });
    });
    group.finish();
}

criterion_group!(benches, bench_owner, bench_key_hash, bench_build);
criterion_main!(benches);
