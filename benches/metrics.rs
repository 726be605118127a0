//! What Prometheus metrics cost on the request path: the recording a
//! coordinator does for one unary `Increment` (its public call and one
//! internal Apply call of one increment: three histograms, a counter, a
//! gauge up and down, an `Arc` clone, two clock reads per timing), with an
//! enabled registry; and what tracing costs when no trace is exported:
//! the call's `debug` span, entered, and its counter recorded, under the
//! daemons' log subscriber (`RUST_LOG` unset: `info`).
//! Histograms hold their samples until the exporter folds them in, every
//! few seconds in a daemon; here every 10,000 calls, outside the timing.
//!
//! Run with `cargo bench --bench metrics`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use tally_coordinator::metrics::{CoordinatorMetrics, Method};
use tally_runtime::metrics::Registry;

fn bench_unary_call(criterion: &mut Criterion) {
    tally_runtime::process::init_tracing();
    let registry = Arc::new(Registry::enabled("coordinator"));
    let metrics = CoordinatorMetrics::new(registry.clone());
    let node = Arc::new(metrics.node("shard-1"));
    criterion.bench_function("metrics/unary_increment", |bench| {
        bench.iter_custom(|iterations| {
            let mut spent = Duration::ZERO;
            let mut done = 0;
            while done < iterations {
                let batch = (iterations - done).min(10_000);
                let start = Instant::now();
                for _ in 0..batch {
                    let call = metrics.call(Method::Increment);
                    let span = call.span();
                    let _entered = span.enter();
                    tracing::Span::current().record("counter", "page:views");
                    let in_flight = black_box(node.clone());
                    in_flight.calls_in_flight.increment(1.0);
                    node.apply_increments.record(black_box(1.0));
                    let apply_began = Instant::now();
                    node.apply_seconds
                        .record(apply_began.elapsed().as_secs_f64());
                    in_flight.calls_in_flight.decrement(1.0);
                    call.finish(&Ok::<(), tonic::Status>(()));
                }
                spent += start.elapsed();
                done += batch;
                black_box(registry.render());
            }
            spent
        });
    });
}

criterion_group!(benches, bench_unary_call);
criterion_main!(benches);
