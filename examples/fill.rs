//! `fill`: writes N counters exactly once each, or checks that they hold a
//! value; the memory rows of `benches/compare.sh` use it.
//!
//! `tallyctl bench --counters N` picks counters at random, so covering every
//! one of 1,000,000 counters takes ~14 million increments (N ln N, the coupon
//! collector), and each counter written several times lands on several of
//! its stripes, which is several entries on the shards. A memory figure
//! "per counter" needs a known number of counters written a known way:
//! this writes `PREFIX0` .. `PREFIX{N-1}`, +1 each, in `IncrementBatch`
//! calls of consecutive names (one entry per counter), and reads them all
//! back with `GetBatch`.
//!
//! ```sh
//! cargo build --release --example fill
//! target/release/examples/fill write --endpoint 127.0.0.1:7700 --prefix mem- --counters 1000000
//! target/release/examples/fill check --endpoint 127.0.0.1:7700 --prefix mem- --counters 1000000
//! ```
//!
//! `write` fails at the first failed call (an unknown number of its
//! increments applied; nothing is retried). `check` fails unless every
//! counter's value is `--value` (default 1). Each prints one JSON line on
//! stdout; errors go to stderr with exit code 1.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use tally_proto::domain::MAX_BATCH_ITEMS;
use tally_proto::pb;
use tally_proto::pb::counter_client::CounterClient;
use tonic::transport::{Channel, Endpoint};

const USAGE: &str = "usage: fill write|check --endpoint URL --prefix PREFIX --counters N \
                     [--batch 1000] [--in-flight 8] [--value 1]";

/// Deadline of each call.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

type Error = Box<dyn std::error::Error>;

struct Args {
    check: bool,
    endpoint: String,
    prefix: String,
    counters: u64,
    batch: u64,
    in_flight: usize,
    value: i64,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let check = match args.next().as_deref() {
        Some("write") => false,
        Some("check") => true,
        _ => return Err(USAGE.into()),
    };
    let mut parsed = Args {
        check,
        endpoint: String::new(),
        prefix: String::new(),
        counters: 0,
        batch: 1000,
        in_flight: 8,
        value: 1,
    };
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .ok_or_else(|| format!("{flag} needs a value; {USAGE}"))?;
        let number = |value: &str| {
            value
                .parse::<u64>()
                .map_err(|error| format!("{flag} {value:?}: {error}"))
        };
        match flag.as_str() {
            "--endpoint" => parsed.endpoint = value,
            "--prefix" => parsed.prefix = value,
            "--counters" => parsed.counters = number(&value)?,
            "--batch" => parsed.batch = number(&value)?,
            "--in-flight" => parsed.in_flight = number(&value)? as usize,
            "--value" => {
                parsed.value = value
                    .parse()
                    .map_err(|error| format!("--value {value:?}: {error}"))?
            }
            _ => return Err(format!("unexpected argument {flag:?}; {USAGE}")),
        }
    }
    if parsed.endpoint.is_empty() || parsed.prefix.is_empty() || parsed.counters == 0 {
        return Err(format!(
            "--endpoint, --prefix and --counters are required; {USAGE}"
        ));
    }
    if parsed.batch == 0 || parsed.batch > MAX_BATCH_ITEMS as u64 || parsed.in_flight == 0 {
        return Err(format!(
            "--batch must be 1 to {MAX_BATCH_ITEMS}, --in-flight at least 1"
        ));
    }
    if !parsed.endpoint.contains("://") {
        parsed.endpoint = format!("http://{}", parsed.endpoint);
    }
    Ok(parsed)
}

/// The counters' names in chunks of `batch` consecutive ones.
fn chunks(args: &Args) -> impl Iterator<Item = Vec<String>> + '_ {
    (0..args.counters)
        .step_by(args.batch as usize)
        .map(move |first| {
            (first..(first + args.batch).min(args.counters))
                .map(|index| format!("{}{index}", args.prefix))
                .collect()
        })
}

async fn write(args: &Args, client: CounterClient<Channel>) -> Result<u64, Error> {
    let calls = futures::stream::iter(chunks(args))
        .map(|names| {
            let mut client = client.clone();
            async move {
                let increments = names
                    .into_iter()
                    .map(|counter| pb::IncrementRequest {
                        counter,
                        delta: 1,
                        idempotency_key: String::new(),
                        ..Default::default()
                    })
                    .collect();
                client
                    .increment_batch(tally_proto::timed(
                        pb::IncrementBatchRequest { increments },
                        CALL_TIMEOUT,
                    ))
                    .await
            }
        })
        .buffer_unordered(args.in_flight);
    let calls = calls
        .try_fold(0u64, |calls, _| async move { Ok(calls + 1) })
        .await
        .map_err(|status| format!("IncrementBatch failed: {status}"))?;
    Ok(calls)
}

async fn check(args: &Args, client: CounterClient<Channel>) -> Result<u64, Error> {
    let wrong = futures::stream::iter(chunks(args))
        .map(|counters| {
            let mut client = client.clone();
            async move {
                client
                    .get_batch(tally_proto::timed(
                        pb::GetBatchRequest {
                            counters,
                            allow_partial: false,
                            ..Default::default()
                        },
                        CALL_TIMEOUT,
                    ))
                    .await
            }
        })
        .buffer_unordered(args.in_flight)
        .map_err(|status| format!("GetBatch failed: {status}"))
        .try_fold(
            (0u64, None::<pb::GetResponse>),
            |(wrong, first), response| async move {
                let mut wrong = wrong;
                let mut first = first;
                for total in response.into_inner().counters {
                    if total.value != args.value || !total.complete {
                        wrong += 1;
                        first.get_or_insert(total);
                    }
                }
                Ok((wrong, first))
            },
        )
        .await?;
    match wrong {
        (0, _) => Ok(args.counters.div_ceil(args.batch)),
        (count, first) => Err(format!(
            "{count} of {} counters do not hold {}, e.g. {first:?}",
            args.counters, args.value
        )
        .into()),
    }
}

async fn run() -> Result<(), Error> {
    let args = parse_args(std::env::args().skip(1))?;
    let channel = Endpoint::from_shared(args.endpoint.clone())?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|error| format!("cannot reach {}: {error}", args.endpoint))?;
    let client = CounterClient::new(channel)
        .max_decoding_message_size(tally_coordinator::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(tally_coordinator::MAX_MESSAGE_BYTES);
    let begin = Instant::now();
    let calls = if args.check {
        check(&args, client).await?
    } else {
        write(&args, client).await?
    };
    let report = serde_json::json!({
        "mode": if args.check { "check" } else { "write" },
        "counters": args.counters,
        "value": args.value,
        "calls": calls,
        "elapsed_secs": begin.elapsed().as_secs_f64(),
    });
    println!("{report}");
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    tally_runtime::process::exit_code("fill", run().await)
}
