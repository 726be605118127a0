//! Benchmarks for the shard node's hot path in `tally-shard`:
//!
//! - `shard/apply`: `Store::apply` of one batch of 1,000 increments, over
//!   1 hot counter (every increment on one entry), 1,000 counters, and
//!   1,000 keyed increments (each records its idempotency key);
//! - `shard/flush_snapshot`: applying 1,000 increments to 1,000 counters,
//!   `Store::begin_flush` collecting them and encoding the log frame's body
//!   (what one group commit does before it writes);
//! - `shard/checkpoint`: capturing every checkpoint bucket of 100,000
//!   counters (what a checkpoint round does, a few segments per turn);
//! - `shard/keys`: encoding an idempotency record key;
//! - `shard/membership_walk`: a membership change's seal on a node holding
//!   1,000,000 idempotency records (the default `idempotency_max_keys`):
//!   the walk over every record that picks, as they travel, those another
//!   node owns in a 4-node ring (three quarters here, since the store holds
//!   keys of every owner; a node handing on to a fourth that joined hands
//!   on about a quarter, so this is the upper end).
//!
//! Run with `cargo bench --bench shard` from the workspace root.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use tally_shard::store::{
    encode_record_key_into, OwnChanges, Store, StripeIncrement, SEGMENT_COUNT,
};

const BATCH: usize = 1_000;

fn names(count: usize) -> Vec<String> {
    (0..count)
        .map(|index| format!("page:views:{index}"))
        .collect()
}

fn bench_apply(criterion: &mut Criterion) {
    let mut group = criterion.benchmark_group("shard/apply");
    let counters = names(BATCH);
    let request_keys: Vec<String> = (0..BATCH)
        .map(|index| format!("request-{index:08}"))
        .collect();

    let store = Store::new();
    let hot: Vec<StripeIncrement<'_>> = (0..BATCH)
        .map(|_| StripeIncrement {
            counter: &counters[0],
            stripe: 3,
            delta: 1,
            idempotency_key: None,
        })
        .collect();
    group.bench_function(
        BenchmarkId::from_parameter("1000_on_one_counter"),
        |bencher| bencher.iter(|| black_box(store.apply(black_box(&hot), 0))),
    );

    let store = Store::new();
    let spread: Vec<StripeIncrement<'_>> = counters
        .iter()
        .enumerate()
        .map(|(index, counter)| StripeIncrement {
            counter,
            stripe: (index % 8) as u32,
            delta: 1,
            idempotency_key: None,
        })
        .collect();
    group.bench_function(BenchmarkId::from_parameter("1000_counters"), |bencher| {
        bencher.iter(|| black_box(store.apply(black_box(&spread), 0)))
    });

    // Keyed: a fresh store each time (a key applies once), so the batch
    // records 1,000 keys; the store's creation is outside the timing.
    let keyed: Vec<StripeIncrement<'_>> = counters
        .iter()
        .zip(&request_keys)
        .map(|(counter, key)| StripeIncrement {
            counter,
            stripe: 0,
            delta: 1,
            idempotency_key: Some(key),
        })
        .collect();
    group.bench_function(BenchmarkId::from_parameter("1000_keyed"), |bencher| {
        bencher.iter_batched(
            Store::new,
            |store| {
                black_box(store.apply(black_box(&keyed), 0));
                store
            },
            criterion::BatchSize::LargeInput,
        )
    });
    group.finish();
}

fn bench_flush_snapshot(criterion: &mut Criterion) {
    let counters = names(BATCH);
    let increments: Vec<StripeIncrement<'_>> = counters
        .iter()
        .map(|counter| StripeIncrement {
            counter,
            stripe: 0,
            delta: 1,
            idempotency_key: None,
        })
        .collect();
    let store = Store::new();
    let mut changes = OwnChanges::default();
    let mut frame = Vec::new();
    criterion.bench_function("shard/flush_snapshot/1000_dirty_counters", |bencher| {
        bencher.iter(|| {
            store.apply(&increments, 0);
            store.begin_flush(&mut changes, 0..0, &mut Vec::new());
            frame.clear();
            changes.encode_into(&mut frame);
            black_box(frame.len())
        })
    });
}

fn bench_checkpoint(criterion: &mut Criterion) {
    let counters = names(100_000);
    let increments: Vec<StripeIncrement<'_>> = counters
        .iter()
        .map(|counter| StripeIncrement {
            counter,
            stripe: 0,
            delta: 1,
            idempotency_key: None,
        })
        .collect();
    let store = Store::new();
    store.apply(&increments, 0);
    let mut changes = OwnChanges::default();
    store.begin_flush(&mut changes, 0..0, &mut Vec::new());
    criterion.bench_function("shard/checkpoint/capture_100000_counters", |bencher| {
        bencher.iter(|| {
            store.mark_all_for_checkpoint();
            let mut captured = Vec::new();
            store.begin_flush(&mut changes, 0..SEGMENT_COUNT, &mut captured);
            black_box(captured.len())
        })
    });
}

fn bench_keys(criterion: &mut Criterion) {
    let mut group = criterion.benchmark_group("shard/keys");
    let mut buffer = Vec::new();
    group.bench_function("encode_record", |bencher| {
        bencher.iter(|| {
            encode_record_key_into(
                &mut buffer,
                black_box("page:views:12345"),
                black_box("request-00001234"),
            );
            black_box(buffer.len())
        })
    });
    group.finish();
}

fn bench_membership_walk(criterion: &mut Criterion) {
    const RECORDS: usize = 1_000_000;
    let store = Store::new();
    let counters = names(1_000);
    let keys: Vec<String> = (0..RECORDS / counters.len())
        .map(|index| format!("request-{index:08}"))
        .collect();
    for key in &keys {
        let batch: Vec<StripeIncrement<'_>> = counters
            .iter()
            .map(|counter| StripeIncrement {
                counter,
                stripe: 0,
                delta: 1,
                idempotency_key: Some(key),
            })
            .collect();
        store.apply(&batch, 0);
    }
    assert_eq!(store.remembered_keys(), RECORDS as u64);
    let nodes: Vec<tally_ring::NodeSpec> = (1..=4)
        .map(|index| tally_ring::NodeSpec {
            id: format!("shard-{index}"),
            weight: 1,
        })
        .collect();
    let ring = tally_ring::Ring::new(&nodes, tally_ring::DEFAULT_VNODES_PER_WEIGHT).unwrap();
    let this = ring.node_index("shard-1");
    let mut group = criterion.benchmark_group("shard/membership_walk");
    group.sample_size(10);
    group.bench_function("1000000_records_4_nodes", |bencher| {
        bencher.iter(|| {
            black_box(
                store
                    .records_where(|counter, key| Some(ring.key_owner(counter, key, 64)) != this)
                    .len(),
            )
        })
    });
    group.finish();
}

criterion_group!(
    benches,
    bench_apply,
    bench_flush_snapshot,
    bench_checkpoint,
    bench_keys,
    bench_membership_walk
);
criterion_main!(benches);
