// A fixed-window rate limiter over Tally: at most --limit requests per user
// in each window of --window seconds, one Increment per request.
//
// As a script, it makes --requests requests (more than the limit) for a
// fresh user within one window and checks that exactly --limit were
// allowed, that every answer's total agrees, and that a read of the window
// gives the limit. If a window ends during the run, each window is checked
// on its own and the run goes on in the new window. Exits 1 on any
// mismatch.
//
// Run through run.sh, which installs the dependencies:
//   run.sh --endpoint 127.0.0.1:7700 --limit 5 --window 60 --requests 12
'use strict';

const crypto = require('node:crypto');
const path = require('node:path');
const { parseArgs } = require('node:util');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO = path.join(__dirname, '..', '..', 'proto', 'tally', 'v1', 'tally.proto');

function loadCounterService() {
  const definition = protoLoader.loadSync(PROTO, {
    keepCase: true, // field names as in the proto: window_seconds, window_end_unix_ms
    // sint64/int64 as JavaScript numbers: a rate limiter's counts and Unix
    // times in milliseconds are far below 2^53. A counter that may pass it
    // needs `longs: String` (exact decimal strings) instead.
    longs: Number,
    defaults: true, // applied 0, complete false present instead of missing
    // proto3 `optional` (IncrementRequest.limit) is sent when the request
    // object has the field, 0 included, and left out when it has not.
  });
  return grpc.loadPackageDefinition(definition).tally.v1.Counter;
}

// Calls a unary method with a 10 s deadline, as a promise.
function call(client, method, request) {
  return new Promise((resolve, reject) => {
    client[method](request, { deadline: Date.now() + 10_000 }, (error, answer) =>
      error ? reject(error) : resolve(answer));
  });
}

// At most `limit` requests per user in each fixed window of `windowSeconds`
// (aligned to the Unix epoch).
class RateLimiter {
  constructor(client, limit, windowSeconds) {
    Object.assign(this, { client, limit, windowSeconds });
  }

  // Counts one request of `user` if the window has room. The answer's
  // `applied` is 1 if it did (0: refused), `total` the window's count after,
  // `window_end_unix_ms` when the window ends (retry after).
  check(user) {
    return call(this.client, 'Increment', {
      counter: `api:${user}`, delta: 1, window_seconds: this.windowSeconds, limit: this.limit,
    });
  }

  async allow(user) {
    return (await this.check(user)).applied === 1;
  }

  // The user's count in the current window, and when it ends.
  async used(user) {
    const answer = await call(this.client, 'Get', {
      counter: `api:${user}`, window_seconds: this.windowSeconds,
    });
    return [answer.value, answer.window_end_unix_ms];
  }
}

const when = (unixMs) => new Date(unixMs).toISOString().slice(11, 23);

async function main() {
  const { values: options } = parseArgs({
    options: {
      endpoint: { type: 'string', default: '127.0.0.1:7700' },
      limit: { type: 'string', default: '5' },
      window: { type: 'string', default: '60' },
      requests: { type: 'string', default: '12' },
      'interval-ms': { type: 'string', default: '0' }, // pause between requests
      'expect-allowed': { type: 'string' },
    },
  });
  const [limit, windowSeconds, requests, intervalMs] =
    [options.limit, options.window, options.requests, options['interval-ms']].map(Number);
  const expected = options['expect-allowed'] === undefined ? limit : Number(options['expect-allowed']);
  if (![limit, windowSeconds, requests, expected].every(Number.isInteger) || !(intervalMs >= 0) || !(limit >= 0 && limit < requests)) {
    console.error('--limit, --window, --requests, --expect-allowed are integers, --interval-ms a number >= 0; --requests more than --limit >= 0');
    return 2;
  }

  const Counter = loadCounterService();
  const client = new Counter(options.endpoint, grpc.credentials.createInsecure());
  try {
    await new Promise((resolve, reject) =>
      client.waitForReady(Date.now() + 10_000, (error) => (error ? reject(error) : resolve())));
  } catch (error) {
    console.log(`nothing answers at ${options.endpoint} within 10s: ${error.message}`);
    return 1;
  }
  const limiter = new RateLimiter(client, limit, windowSeconds);

  // A fresh user: the run does not depend on what the cluster held before.
  const user = `node-${crypto.randomBytes(4).toString('hex')}`;
  const sent = new Map();
  const allowed = new Map();
  const problems = [];
  let read = null;
  const started = process.hrtime.bigint();
  // Bounded: a window too short for the requests fails instead of looping.
  for (let attempt = 0; attempt < requests * 5 && read === null; attempt += 1) {
    if (attempt > 0 && intervalMs > 0) await new Promise((resolve) => setTimeout(resolve, intervalMs));
    const answer = await limiter.check(user);
    const window = answer.window_end_unix_ms;
    if (window === 0) {
      console.log('the answer has no window end: does the coordinator implement window_seconds?');
      return 1;
    }
    const before = { sent: sent.get(window) ?? 0, allowed: allowed.get(window) ?? 0 };
    if (answer.applied === 0 && before.allowed === before.sent) {
      const retry = (window - Date.now()) / 1000;
      console.log(`request ${before.sent + 1} refused: retry after ${retry.toFixed(1)}s (window ends ${when(window)} UTC)`);
    }
    sent.set(window, before.sent + 1);
    allowed.set(window, before.allowed + answer.applied);
    if (![0, 1].includes(answer.applied) || answer.total !== allowed.get(window) || !answer.complete) {
      problems.push(`request ${sent.get(window)} in window ${when(window)}: applied ${answer.applied}, ` +
        `total ${answer.total}, complete ${answer.complete}; ${allowed.get(window)} allowed so far`);
    }
    if (sent.get(window) < requests) continue;
    let value;
    let readWindow;
    try {
      [value, readWindow] = await limiter.used(user);
    } catch (error) {
      // The window ended by a shard's clock before the read.
      if (error.code !== grpc.status.FAILED_PRECONDITION) throw error;
      console.log(`read of window ${when(window)}: ${error.details}; again in the next window`);
      continue;
    }
    if (readWindow === window) {
      read = { value, window };
    } else {
      console.log(`window ${when(window)} ended before the read; again in the next window`);
    }
  }
  if (read === null) {
    console.log(`no window of ${windowSeconds}s took ${requests} requests in ${requests * 5} tries`);
    return 1;
  }
  const elapsed = Number(process.hrtime.bigint() - started) / 1e9;

  const total = [...sent.values()].reduce((sum, count) => sum + count, 0);
  console.log(`user ${user}, limit ${limit} per ${windowSeconds}s window, ${total} requests in ${elapsed.toFixed(2)}s:`);
  for (const window of [...sent.keys()].sort((a, b) => a - b)) {
    console.log(`  window ending ${when(window)} UTC: ${sent.get(window)} sent, ${allowed.get(window)} allowed`);
    // A window that ended early in the run got fewer requests than the
    // limit allows only when the run crossed into the next one.
    const want = Math.min(sent.get(window), expected);
    if (allowed.get(window) !== want) {
      problems.push(`window ${when(window)}: ${allowed.get(window)} allowed of ${sent.get(window)}, expected ${want}`);
    }
  }
  console.log(`  read of the window: ${read.value} (window ends ${when(read.window)} UTC)`);
  if (read.value !== expected) {
    problems.push(`the read of window ${when(read.window)} gave ${read.value}, expected ${expected}`);
  }
  for (const problem of problems) console.log(`MISMATCH ${problem}`);
  if (problems.length > 0) return 1;
  console.log(`exactly ${expected} of ${sent.get(read.window)} requests allowed in the window, and the read agrees`);
  return 0;
}

module.exports = { RateLimiter, loadCounterService };

if (require.main === module) {
  main().then(
    (code) => process.exit(code),
    (error) => {
      console.error(`failed: ${error.message ?? error}`);
      process.exit(1);
    },
  );
}
