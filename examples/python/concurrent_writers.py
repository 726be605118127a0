"""Many concurrent writers through stubs generated from tally.proto, then a
check that every total equals what the writers were acknowledged for.

Run through run.sh, which generates the stubs. Exits 1 on any mismatch.
"""

import argparse
import random
import sys
import threading
import time
import uuid

import grpc
from tally.v1 import tally_pb2, tally_pb2_grpc


def writer(stub, counters, increments, seed, ledger, lock, errors):
    rng = random.Random(seed)
    local = {}
    try:
        for index in range(increments):
            counter = rng.choice(counters)
            delta = rng.choice([1, 1, 1, 5, -3, 1_000_000, -999_999])
            if index % 10 == 0:
                # Every tenth call is a batch of three increments.
                other = rng.choice(counters)
                stub.IncrementBatch(
                    tally_pb2.IncrementBatchRequest(
                        increments=[
                            tally_pb2.IncrementRequest(counter=counter, delta=delta),
                            tally_pb2.IncrementRequest(counter=other, delta=2),
                            tally_pb2.IncrementRequest(counter=counter, delta=-1),
                        ]
                    ),
                    timeout=10,
                )
                local[counter] = local.get(counter, 0) + delta - 1
                local[other] = local.get(other, 0) + 2
            else:
                stub.Increment(tally_pb2.IncrementRequest(counter=counter, delta=delta), timeout=10)
                local[counter] = local.get(counter, 0) + delta
    except grpc.RpcError as error:
        errors.append(f"{error.code()}: {error.details()}")
    with lock:
        for counter, delta in local.items():
            ledger[counter] = ledger.get(counter, 0) + delta


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--endpoint", default="127.0.0.1:7700")
    parser.add_argument("--writers", type=int, default=32)
    parser.add_argument("--increments", type=int, default=200, help="calls per writer")
    parser.add_argument("--counters", type=int, default=16)
    args = parser.parse_args()

    channel = grpc.insecure_channel(args.endpoint)
    grpc.channel_ready_future(channel).result(timeout=10)
    stub = tally_pb2_grpc.CounterStub(channel)

    # A fresh prefix: the run does not depend on what the cluster held before.
    run = uuid.uuid4().hex[:8]
    counters = [f"python-{run}-{index}" for index in range(args.counters)]
    ledger, lock, errors = {}, threading.Lock(), []
    started = time.monotonic()
    threads = [
        threading.Thread(target=writer, args=(stub, counters, args.increments, seed, ledger, lock, errors))
        for seed in range(args.writers)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    if errors:
        print(f"{len(errors)} writers failed, first: {errors[0]}")
        return 1

    answer = stub.GetBatch(tally_pb2.GetBatchRequest(counters=counters), timeout=10)
    mismatches = [
        (total.counter, total.value, ledger.get(total.counter, 0))
        for total in answer.counters
        if not total.complete or total.value != ledger.get(total.counter, 0)
    ]
    calls = args.writers * args.increments
    print(f"{args.writers} writers, {calls} calls in {elapsed:.1f}s, {len(counters)} counters")
    if [total.counter for total in answer.counters] != counters:
        print("GetBatch answered out of order")
        return 1
    if mismatches:
        for counter, got, expected in mismatches:
            print(f"MISMATCH {counter}: read {got}, acknowledged {expected}")
        return 1

    try:
        stub.Increment(tally_pb2.IncrementRequest(counter="", delta=1), timeout=10)
        print("an empty counter name was accepted")
        return 1
    except grpc.RpcError as error:
        if error.code() != grpc.StatusCode.INVALID_ARGUMENT:
            print(f"empty name gave {error.code()}, expected INVALID_ARGUMENT")
            return 1

    print(f"all {len(counters)} totals equal the acknowledged sums")
    return 0


if __name__ == "__main__":
    sys.exit(main())
