"""A fixed-window rate limiter over Tally: at most --limit requests per user
in each window of --window seconds, one Increment per request.

As a script, it makes --requests requests (more than the limit) for a fresh
user within one window and checks that exactly --limit were allowed, that
every answer's total agrees, and that a read of the window gives the limit.
If a window ends during the run, each window is checked on its own and the
run goes on in the new window. Exits 1 on any mismatch.

Run through run.sh, which generates the stubs: run.sh rate_limiter.py
"""

import argparse
import collections
import datetime
import sys
import time
import uuid

import grpc
from tally.v1 import tally_pb2, tally_pb2_grpc


class RateLimiter:
    """At most `limit` requests per user in each fixed window of
    `window_seconds` (aligned to the Unix epoch)."""

    def __init__(self, stub, limit, window_seconds):
        self.stub, self.limit, self.window_seconds = stub, limit, window_seconds

    def check(self, user):
        """Counts one request of `user` if the window has room. The answer's
        `applied` is 1 if it did (0: refused), `total` the window's count
        after, `window_end_unix_ms` when the window ends (retry after)."""
        return self.stub.Increment(
            tally_pb2.IncrementRequest(
                counter=f"api:{user}", delta=1, window_seconds=self.window_seconds, limit=self.limit
            ),
            timeout=10,
        )

    def allow(self, user):
        return self.check(user).applied == 1

    def used(self, user):
        """The user's count in the current window, and when it ends."""
        answer = self.stub.Get(
            tally_pb2.GetRequest(counter=f"api:{user}", window_seconds=self.window_seconds), timeout=10
        )
        return answer.value, answer.window_end_unix_ms


def when(unix_ms):
    return datetime.datetime.fromtimestamp(unix_ms / 1000, datetime.timezone.utc).strftime("%H:%M:%S.%f")[:-3]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--endpoint", default="127.0.0.1:7700")
    parser.add_argument("--limit", type=int, default=5, help="requests allowed per window")
    parser.add_argument("--window", type=int, default=60, help="window length in seconds")
    parser.add_argument("--requests", type=int, default=12, help="requests to make in one window")
    parser.add_argument("--interval-ms", type=int, default=0, help="pause between requests")
    parser.add_argument("--expect-allowed", type=int, help="allowed requests to expect (default: --limit)")
    args = parser.parse_args()
    if not 0 <= args.limit < args.requests:
        parser.error("--requests must be more than --limit, and --limit at least 0")
    expected = args.limit if args.expect_allowed is None else args.expect_allowed

    channel = grpc.insecure_channel(args.endpoint)
    try:
        grpc.channel_ready_future(channel).result(timeout=10)
    except grpc.FutureTimeoutError:
        print(f"nothing answers at {args.endpoint} within 10s")
        return 1
    limiter = RateLimiter(tally_pb2_grpc.CounterStub(channel), args.limit, args.window)

    # A fresh user: the run does not depend on what the cluster held before.
    user = f"python-{uuid.uuid4().hex[:8]}"
    sent = collections.Counter()
    allowed = collections.Counter()
    problems = []
    read = None
    started = time.monotonic()
    # Bounded: a window too short for the requests fails instead of looping.
    for index in range(args.requests * 5):
        if index > 0 and args.interval_ms > 0:
            time.sleep(args.interval_ms / 1000)
        answer = limiter.check(user)
        window = answer.window_end_unix_ms
        if window == 0:
            print("the answer has no window end: does the coordinator implement window_seconds?")
            return 1
        if answer.applied == 0 and allowed[window] == sent[window]:
            retry = (window - time.time() * 1000) / 1000
            print(f"request {sent[window] + 1} refused: retry after {retry:.1f}s (window ends {when(window)} UTC)")
        sent[window] += 1
        allowed[window] += answer.applied
        if answer.applied not in (0, 1) or answer.total != allowed[window] or not answer.complete:
            problems.append(
                f"request {sent[window]} in window {when(window)}: applied {answer.applied}, "
                f"total {answer.total}, complete {answer.complete}; {allowed[window]} allowed so far"
            )
        if sent[window] < args.requests:
            continue
        try:
            read = limiter.used(user)
        except grpc.RpcError as error:
            # The window ended by a shard's clock before the read.
            if error.code() != grpc.StatusCode.FAILED_PRECONDITION:
                raise
            print(f"read of window {when(window)}: {error.details()}; again in the next window")
            continue
        if read[1] == window:
            break
        print(f"window {when(window)} ended before the read; again in the next window")
    else:
        print(f"no window of {args.window}s took {args.requests} requests in {args.requests * 5} tries")
        return 1
    elapsed = time.monotonic() - started

    print(f"user {user}, limit {args.limit} per {args.window}s window, {sum(sent.values())} requests in {elapsed:.2f}s:")
    for window in sorted(sent):
        print(f"  window ending {when(window)} UTC: {sent[window]} sent, {allowed[window]} allowed")
        # A window that ended early in the run got fewer requests than the
        # limit allows only when the run crossed into the next one.
        if allowed[window] != min(sent[window], expected):
            problems.append(f"window {when(window)}: {allowed[window]} allowed of {sent[window]}, expected {min(sent[window], expected)}")
    value, window = read
    print(f"  read of the window: {value} (window ends {when(window)} UTC)")
    if value != expected:
        problems.append(f"the read of window {when(window)} gave {value}, expected {expected}")
    for problem in problems:
        print(f"MISMATCH {problem}")
    if problems:
        return 1
    print(f"exactly {expected} of {sent[window]} requests allowed in the window, and the read agrees")
    return 0


if __name__ == "__main__":
    sys.exit(main())
