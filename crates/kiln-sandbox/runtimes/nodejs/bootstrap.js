'use strict';
// Kiln's Node.js runtime bootstrap: FC's event handler model on FC's
// custom-runtime HTTP contract.
//
// The agent starts this file as the instance's process (the `nodejs18`
// built-in runtime). It listens on FC_CUSTOM_LISTEN_PORT and answers:
//
//   POST /invoke      calls the handler (FC's `index.handler`: module
//                     `index` from /code, export `handler`), either
//                     `async (event, context)` or
//                     `(event, context, callback)`; the event is the
//                     request body as a Buffer; the result is the body
//   POST /initialize  calls the initializer `(context[, callback])`, once
//   GET  /pre-stop    calls the PreStop hook `(context[, callback])`
//
// with the x-fc-* headers the agent sends. An error the function does not
// catch is answered with FC's error body (errorMessage, errorType,
// stackTrace) and `x-fc-status: 404`, FC's custom-runtime mark of a
// function error: the agent reports a function error and the gateway
// answers with `x-fc-error-type: UnhandledInvocationError`.
//
// Every invocation's `FC Invoke Start/End RequestId` lines are written by
// the agent for all runtimes; this bootstrap writes the initializer's and
// the PreStop hook's. console.* lines carry the call's request id, as FC's
// runtime prints them.
//
// HTTP triggers: today an HTTP trigger's call arrives here as any other
// invocation. FC 3.0's HTTP-trigger event JSON and its
// statusCode/headers/body/isBase64Encoded answer belong in `invoke` below,
// keyed on the marker header the trigger path will send.

const http = require('http');
const path = require('path');
const util = require('util');
const { AsyncLocalStorage } = require('async_hooks');

const CODE_DIR = process.env.FC_FUNC_CODE_PATH || '/code';
const calls = new AsyncLocalStorage();

function requestId() {
  return calls.getStore() || '';
}

// FC's log line: `2024-01-02T03:04:05.678Z <request id> [INFO] message`.
function line(level, args) {
  return `${new Date().toISOString()} ${requestId()} [${level}] ${util.format(...args)}\n`;
}

const logger = {
  debug: (...a) => process.stdout.write(line('DEBUG', a)),
  info: (...a) => process.stdout.write(line('INFO', a)),
  log: (...a) => process.stdout.write(line('INFO', a)),
  warn: (...a) => process.stdout.write(line('WARN', a)),
  error: (...a) => process.stdout.write(line('ERROR', a)),
};
console.log = (...a) => process.stdout.write(line('verbose', a));
console.info = (...a) => process.stdout.write(line('info', a));
console.debug = (...a) => process.stdout.write(line('debug', a));
console.warn = (...a) => process.stderr.write(line('warn', a));
console.error = (...a) => process.stderr.write(line('error', a));

class HandlerError extends Error {
  constructor(type, message) {
    super(message);
    this.name = type;
    this.handlerError = true;
  }
}

// `index.handler` -> ['index', 'handler']; `src/app.main` -> ['src/app', 'main'].
function parseHandler(handler) {
  const dot = handler.lastIndexOf('.');
  if (dot <= 0 || dot === handler.length - 1) {
    throw new HandlerError('InvalidHandler',
      `Invalid handler ${JSON.stringify(handler)}: give it as module.function (e.g. index.handler)`);
  }
  return [handler.slice(0, dot), handler.slice(dot + 1)];
}

// Loaded once per instance; a failed load is tried again on the next call.
const loaded = new Map();

function load(handler) {
  const cached = loaded.get(handler);
  if (cached) return cached;
  const [module, name] = parseHandler(handler);
  const file = path.resolve(CODE_DIR, module);
  let exports;
  try {
    exports = require(file);
  } catch (e) {
    if (e && e.code === 'MODULE_NOT_FOUND' && String(e.message).includes(`'${file}'`)) {
      throw new HandlerError('ImportModuleError',
        `Unable to import module '${module}' for handler ${JSON.stringify(handler)}: no ${module}.js in ${CODE_DIR}`);
    }
    throw e;
  }
  const fn = exports && exports[name];
  if (typeof fn !== 'function') {
    throw new HandlerError('HandlerNotFound',
      `Handler '${name}' is missing on module '${module}': export it (exports.${name} = ...)`);
  }
  loaded.set(handler, fn);
  return fn;
}

function header(headers, name, fallback) {
  const v = headers[name];
  return v === undefined || v === '' ? (fallback || '') : v;
}

function context(headers) {
  const qualifier = header(headers, 'x-fc-qualifier', 'LATEST');
  return {
    requestId: header(headers, 'x-fc-request-id'),
    credentials: {
      accessKeyId: header(headers, 'x-fc-access-key-id'),
      accessKeySecret: header(headers, 'x-fc-access-key-secret'),
      securityToken: header(headers, 'x-fc-security-token'),
    },
    function: {
      name: header(headers, 'x-fc-function-name', process.env.FC_FUNCTION_NAME),
      handler: header(headers, 'x-fc-function-handler', process.env.FC_FUNCTION_HANDLER),
      memory: Number(header(headers, 'x-fc-function-memory', process.env.FC_FUNCTION_MEMORY_SIZE)) || 0,
      timeout: Number(header(headers, 'x-fc-function-timeout')) || 0,
      initializer: header(headers, 'x-fc-function-initializer', initializer.handler),
      initializationTimeout: Number(header(headers, 'x-fc-initialization-timeout', initializer.timeout)) || 0,
    },
    service: {
      name: '',
      logProject: '',
      logStore: '',
      qualifier,
      versionId: qualifier === 'LATEST' ? '' : qualifier,
    },
    region: header(headers, 'x-fc-region', process.env.FC_REGION),
    accountId: header(headers, 'x-fc-account-id', process.env.FC_ACCOUNT_ID),
    instanceID: process.env.FC_INSTANCE_ID || '',
    logger,
  };
}

// Call `fn(...args, callback)`: the result of a returned promise, of the
// callback, or (a function that takes no callback) the returned value.
function call(fn, args) {
  return new Promise((resolve, reject) => {
    let done = false;
    const callback = (err, result) => {
      if (done) return;
      done = true;
      if (err !== null && err !== undefined) reject(err);
      else resolve(result);
    };
    let ret;
    try {
      ret = fn(...args, callback);
    } catch (e) {
      callback(e);
      return;
    }
    if (ret && typeof ret.then === 'function') {
      ret.then((v) => callback(null, v), (e) => callback(e === undefined ? new Error('undefined') : e));
    } else if (fn.length <= args.length) {
      callback(null, ret);
    }
  });
}

function errorBody(err) {
  if (err && err.handlerError) {
    return { errorMessage: err.message, errorType: err.name };
  }
  if (err instanceof Error) {
    const stack = String(err.stack || '').split('\n').slice(1).map((s) => s.trim())
      .filter((s) => s && !s.includes(__filename) && !s.includes('(node:') && !s.includes('(<anonymous>)'));
    return { errorMessage: err.message, errorType: err.name || 'Error', stackTrace: stack };
  }
  return { errorMessage: typeof err === 'string' ? err : JSON.stringify(err), errorType: 'Error', stackTrace: [] };
}

// The result as the answer's body: Buffer and string as they are,
// undefined/null as nothing, anything else as JSON.
function encode(result) {
  if (result === undefined || result === null) return Buffer.alloc(0);
  if (Buffer.isBuffer(result)) return result;
  if (result instanceof Uint8Array) return Buffer.from(result);
  if (typeof result === 'string') return Buffer.from(result, 'utf8');
  return Buffer.from(JSON.stringify(result), 'utf8');
}

function answer(res, status, body, error) {
  const headers = {
    'content-type': error ? 'application/json' : 'application/octet-stream',
    'content-length': body.length,
  };
  if (error) headers['x-fc-status'] = '404';
  res.writeHead(status, headers);
  res.end(body);
}

function fail(res, err) {
  const body = errorBody(err);
  logger.error(`${body.errorType}: ${body.errorMessage}${body.stackTrace ? '\n' + body.stackTrace.join('\n') : ''}`);
  answer(res, 404, Buffer.from(JSON.stringify(body)), true);
}

// The agent's mark of an HTTP trigger's call (FC's custom-runtime header):
// the request is the caller's own, method, path and all.
const HTTP_INVOKE = '/http-invoke';

// FC 3.0's HTTP trigger event for a handler: the request as JSON. FC's own
// x-fc-* headers (credentials among them) are not part of it.
function httpEvent(req, body, ctx) {
  const url = new URL(req.url, 'http://localhost');
  const text = body.toString('utf8');
  const b64 = !Buffer.from(text, 'utf8').equals(body);
  const headers = {};
  for (const [k, v] of Object.entries(req.headers)) {
    if (!k.startsWith('x-fc-')) headers[k] = Array.isArray(v) ? v.join(', ') : v;
  }
  const query = {};
  for (const [k, v] of url.searchParams) query[k] = v;
  const domain = req.headers['x-forwarded-host'] || req.headers.host || '';
  const now = Date.now();
  return {
    version: 'v1',
    rawPath: url.pathname,
    body: b64 ? body.toString('base64') : text,
    isBase64Encoded: b64,
    headers,
    queryParameters: query,
    requestContext: {
      accountId: ctx.accountId,
      domainName: domain,
      domainPrefix: domain.split('.')[0],
      http: {
        method: req.method,
        path: url.pathname,
        protocol: 'HTTP/1.1',
        sourceIp: String(req.headers['x-forwarded-for'] || '').split(',')[0].trim(),
        userAgent: req.headers['user-agent'] || '',
      },
      requestId: ctx.requestId,
      time: new Date(now).toISOString().replace(/\.\d{3}Z$/, 'Z'),
      timeEpoch: String(now),
    },
  };
}

// The handler's answer to an HTTP trigger: FC 3.0's response shape
// (statusCode, headers, body, isBase64Encoded), as an object or a JSON
// string of one; anything else is a 200 with the value as its body.
function httpResponse(result) {
  let shaped = result;
  if (typeof result === 'string' || Buffer.isBuffer(result)) {
    try {
      shaped = JSON.parse(result.toString());
    } catch (_) {
      shaped = null;
    }
  }
  if (shaped && typeof shaped === 'object' && !Buffer.isBuffer(shaped) && 'statusCode' in shaped) {
    const headers = {};
    for (const [k, v] of Object.entries(shaped.headers || {})) headers[k] = String(v);
    let out = shaped.body;
    if (shaped.isBase64Encoded && typeof out === 'string') out = Buffer.from(out, 'base64');
    return { status: Number(shaped.statusCode) || 200, headers, body: encode(out) };
  }
  return { status: 200, headers: {}, body: encode(result) };
}

async function httpInvoke(req, res, body) {
  const ctx = context(req.headers);
  let out;
  try {
    const event = Buffer.from(JSON.stringify(httpEvent(req, body, ctx)), 'utf8');
    out = httpResponse(await call(load(ctx.function.handler), [event, ctx]));
  } catch (e) {
    fail(res, e);
    return;
  }
  const headers = {};
  for (const [k, v] of Object.entries(out.headers)) {
    if (!['content-length', 'transfer-encoding', 'connection'].includes(k.toLowerCase())) headers[k] = v;
  }
  if (!Object.keys(headers).some((k) => k.toLowerCase() === 'content-type')) {
    headers['content-type'] = 'application/octet-stream';
  }
  headers['content-length'] = out.body.length;
  res.writeHead(out.status, headers);
  res.end(req.method === 'HEAD' ? undefined : out.body);
}

let initialized = false;
// The initializer and its timeout as /initialize named them: the agent
// sends them on that call only, FC's context carries them on every call.
const initializer = { handler: '', timeout: '0' };

async function invoke(req, res, body) {
  const ctx = context(req.headers);
  let result;
  try {
    result = await call(load(ctx.function.handler), [body, ctx]);
  } catch (e) {
    fail(res, e);
    return;
  }
  answer(res, 200, encode(result), false);
}

async function hook(name, handler, req, res) {
  const ctx = context(req.headers);
  process.stdout.write(`FC ${name} Start RequestId: ${ctx.requestId}\n`);
  try {
    if (handler && !(name === 'Initialize' && initialized)) {
      await call(load(handler), [ctx]);
      if (name === 'Initialize') initialized = true;
    }
  } catch (e) {
    fail(res, e);
    process.stdout.write(`FC ${name} End RequestId: ${ctx.requestId}, Error: Unhandled function error\n`);
    return;
  }
  process.stdout.write(`FC ${name} End RequestId: ${ctx.requestId}\n`);
  answer(res, 200, Buffer.alloc(0), false);
}

const server = http.createServer((req, res) => {
  const chunks = [];
  req.on('data', (c) => chunks.push(c));
  req.on('end', () => {
    const body = Buffer.concat(chunks);
    const id = req.headers['x-fc-request-id'] || '';
    calls.run(id, () => {
      if (req.headers['x-fc-control-path'] === HTTP_INVOKE) {
        httpInvoke(req, res, body);
      } else if (req.method === 'POST' && req.url === '/invoke') {
        invoke(req, res, body);
      } else if (req.method === 'POST' && req.url === '/initialize') {
        initializer.handler = req.headers['x-fc-function-initializer'] || '';
        initializer.timeout = req.headers['x-fc-initialization-timeout'] || '0';
        hook('Initialize', initializer.handler, req, res);
      } else if (req.method === 'GET' && req.url === '/pre-stop') {
        hook('PreStop', req.headers['x-fc-instance-lifecycle-pre-stop-handler'] || '', req, res);
      } else {
        answer(res, 404, Buffer.alloc(0), false);
      }
    });
  });
});
// Longer than the agent keeps an idle connection (4 s), so the agent, not
// the runtime, closes idle ones.
server.keepAliveTimeout = 65000;
server.headersTimeout = 66000;
server.requestTimeout = 0;

process.on('SIGTERM', () => process.exit(0));
process.on('unhandledRejection', (e) => {
  logger.error(`Unhandled promise rejection: ${e && e.stack ? e.stack : e}`);
});

const port = Number(process.env.FC_CUSTOM_LISTEN_PORT || process.env.FC_SERVER_PORT || 9000);
server.listen(port, '0.0.0.0');
