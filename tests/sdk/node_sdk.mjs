#!/usr/bin/env node
// Drives Kiln with the official Node SDK for FC 3.0 (@alicloud/fc20230330).
//
// Run (Kiln's integration test does this):
//
//   cd tests/sdk && npm ci
//   node tests/sdk/node_sdk.mjs CREDENTIALS.json CODE.zip \
//       [--name NAME] [--runtime custom.debian12] [--command python3 server.py] \
//       [--payload '{"hello":"kiln"}'] [--expect SUBSTRING]
//
// CREDENTIALS.json is what `kiln dev` writes: {"endpoint": "https://127.0.0.1:PORT",
// "accountId", "accessKeyId", "accessKeySecret", "caCert": "/path/ca.pem"}. Options fall back
// to the environment: KILN_SDK_NAME, KILN_SDK_RUNTIME, KILN_SDK_COMMAND (a JSON list),
// KILN_SDK_PAYLOAD, KILN_SDK_EXPECT.
//
// Nothing in the SDK is changed. The client is configured only with:
//   - endpoint: the host:port of the credentials' endpoint (an explicit endpoint is used as the
//     Host verbatim; the SDK prepends no account id or region) and protocol "https";
//   - the access key id and secret;
//   - ca: the CA PEM's *contents* (Config.ca becomes the `ca` option of Node's https request;
//     NODE_EXTRA_CA_CERTS=/path/ca.pem set before node starts works as well);
//   - read/connect timeouts long enough for a cold start (httpx's default read timeout is 3 s).
//
// Steps (one line each, "ok"/"FAIL"; exit status 1 on the first failure): CreateFunction (two
// functions sharing a prefix), GetFunction, ListFunctions (prefix, limit 1, following
// nextToken), UpdateFunction (memorySize and environment), InvokeFunction (body checked),
// versions and aliases (PublishFunctionVersion twice, ListFunctionVersions, CreateAlias with a
// canary weight, the alias's async invoke and provision configs, InvokeFunction by version and alias, GetFunctionCode with its download,
// UpdateAlias rolling forward, GetAlias, ListAliases, DeleteAlias, DeleteFunctionVersion),
// tags (TagResources, ListTagResources, UntagResources), triggers (an anonymous HTTP trigger
// called at its URL, a timer trigger; Create/Get/List/Update/DeleteTrigger),
// Disable/EnableFunctionInvocation (a call refused in between), custom domains
// (Create/Get/List/Update/DeleteCustomDomain, with KILN_SDK_DOMAIN* naming a certificate),
// DeleteFunction, and GetFunction again expecting FC's FunctionNotFound error
// (404, {"Code","Message","RequestId"}). Functions created are deleted even on failure.
// With examples/hello-python the invoke check is exact; otherwise pass --expect.

import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import https from 'node:https';
import { parseArgs } from 'node:util';

import fcModule from '@alicloud/fc20230330';
import openapiModule from '@alicloud/openapi-core';
import dara from '@darabonba/typescript';

const FcClient = fcModule.default;
const fc = fcModule;
const { Config } = openapiModule.$OpenApiUtil;

class StepFailed extends Error {}

async function step(name, fn) {
  let detail;
  try {
    detail = await fn();
  } catch (e) {
    const code = e && e.code ? ` [${e.code}]` : '';
    console.log(`FAIL ${name}: ${e && e.name}${code}: ${e && e.message}`);
    throw new StepFailed(name);
  }
  console.log(`ok   ${name}: ${detail}`);
  return detail;
}

function check(cond, message) {
  if (!cond) throw new Error(message);
}

function options() {
  const { values, positionals } = parseArgs({
    allowPositionals: true,
    options: {
      name: { type: 'string' },
      runtime: { type: 'string' },
      command: { type: 'string', multiple: true },
      port: { type: 'string' },
      payload: { type: 'string' },
      expect: { type: 'string' },
    },
  });
  // --command takes the rest of the words up to the next option: `--command python3 server.py`.
  let command = values.command;
  if (command) {
    const at = process.argv.indexOf('--command');
    command = [];
    for (let i = at + 1; i < process.argv.length && !process.argv[i].startsWith('--'); i++) {
      command.push(process.argv[i]);
    }
  }
  const extra = new Set(command || []);
  const files = positionals.filter((p) => !extra.has(p));
  if (files.length !== 2) {
    console.error('usage: node_sdk.mjs CREDENTIALS.json CODE.zip [--name N] [--runtime R] [--command ...] [--payload P] [--expect S]');
    process.exit(2);
  }
  const env = process.env;
  return {
    credentials: files[0],
    zip: files[1],
    name: values.name || env.KILN_SDK_NAME || `sdknode-${randomBytes(4).toString('hex')}`,
    runtime: values.runtime || env.KILN_SDK_RUNTIME || 'custom.debian12',
    command: command || JSON.parse(env.KILN_SDK_COMMAND || '["python3", "server.py"]'),
    port: Number(values.port || 9000),
    payload: values.payload ?? env.KILN_SDK_PAYLOAD ?? '{"hello": "kiln"}',
    expect: values.expect ?? env.KILN_SDK_EXPECT,
  };
}

function makeClient(cred) {
  let [scheme, hostport] = cred.endpoint.includes('://') ? cred.endpoint.split('://') : ['https', cred.endpoint];
  return new FcClient(new Config({
    accessKeyId: cred.accessKeyId,
    accessKeySecret: cred.accessKeySecret,
    endpoint: hostport.replace(/\/+$/, ''),
    protocol: scheme,
    ca: cred.caCert ? readFileSync(cred.caCert, 'utf8') : undefined,
    connectTimeout: 10000,
    readTimeout: 180000,
  }));
}

async function main() {
  const args = options();
  const cred = JSON.parse(readFileSync(args.credentials, 'utf8'));
  const code = readFileSync(args.zip);
  const client = makeClient(cred);
  console.log(`ok   client: endpoint=${cred.endpoint} account=${cred.accountId} function=${args.name}`);

  const names = [args.name, `${args.name}-b`];
  const created = new Set();
  const greeting = 'hello from the node sdk';
  const updated = 'updated by the node sdk';

  const create = async (name, env) => {
    const res = await client.createFunction(new fc.CreateFunctionRequest({
      body: new fc.CreateFunctionInput({
        functionName: name,
        runtime: args.runtime,
        handler: 'index.handler',
        memorySize: 512,
        timeout: 60,
        instanceConcurrency: 2,
        environmentVariables: { GREETING: env },
        customRuntimeConfig: new fc.CustomRuntimeConfig({ command: args.command, port: args.port }),
        code: new fc.InputCodeLocation({ zipFile: code.toString('base64') }),
      }),
    }));
    created.add(name);
    const b = res.body;
    check(res.statusCode === 200 || res.statusCode === 201, `status ${res.statusCode}`);
    check(b.functionName === name, `functionName ${b.functionName}`);
    check(b.runtime === args.runtime, `runtime ${b.runtime}`);
    check(b.memorySize === 512, `memorySize ${b.memorySize}`);
    check(b.codeSize === code.length, `codeSize ${b.codeSize} != ${code.length}`);
    check(!!b.codeChecksum, 'codeChecksum missing');
    return `${name} codeSize=${b.codeSize} codeChecksum=${b.codeChecksum}`;
  };

  const get = async () => {
    const b = (await client.getFunction(args.name, new fc.GetFunctionRequest({}))).body;
    check(b.functionName === args.name, `functionName ${b.functionName}`);
    check(JSON.stringify(b.customRuntimeConfig.command) === JSON.stringify(args.command),
      `command ${JSON.stringify(b.customRuntimeConfig.command)}`);
    check(b.environmentVariables && b.environmentVariables.GREETING === greeting,
      `environmentVariables ${JSON.stringify(b.environmentVariables)}`);
    return `${b.functionName} runtime=${b.runtime} memorySize=${b.memorySize} timeout=${b.timeout}`;
  };

  const listAll = async () => {
    const seen = [];
    let token;
    let pages = 0;
    for (;;) {
      pages += 1;
      check(pages <= 10, 'nextToken never ran out');
      const body = (await client.listFunctions(new fc.ListFunctionsRequest({
        prefix: args.name, limit: 1, nextToken: token,
      }))).body;
      const got = (body.functions || []).map((f) => f.functionName);
      check(got.length <= 1, `limit 1 returned ${got}`);
      seen.push(...got);
      token = body.nextToken;
      if (!token) break;
    }
    check(JSON.stringify([...seen].sort()) === JSON.stringify([...names].sort()),
      `listed ${seen}, expected ${names}`);
    return `${JSON.stringify(seen)} in ${pages} pages`;
  };

  const update = async () => {
    const b = (await client.updateFunction(args.name, new fc.UpdateFunctionRequest({
      body: new fc.UpdateFunctionInput({ memorySize: 1024, environmentVariables: { GREETING: updated } }),
    }))).body;
    check(b.memorySize === 1024, `memorySize ${b.memorySize}`);
    check(b.environmentVariables && b.environmentVariables.GREETING === updated,
      `environmentVariables ${JSON.stringify(b.environmentVariables)}`);
    const again = (await client.getFunction(args.name, new fc.GetFunctionRequest({}))).body;
    check(again.memorySize === 1024, `GetFunction after update: memorySize ${again.memorySize}`);
    return `memorySize=${b.memorySize} lastModifiedTime=${b.lastModifiedTime}`;
  };

  const invoke = async () => {
    const res = await client.invokeFunctionWithOptions(
      args.name,
      new fc.InvokeFunctionRequest({ body: new dara.BytesReadable(Buffer.from(args.payload)) }),
      new fc.InvokeFunctionHeaders({ xFcInvocationType: 'Sync' }),
      new dara.RuntimeOptions({}),
    );
    const text = (await dara.Stream.readAsBytes(res.body)).toString('utf8');
    check(res.statusCode === 200, `status ${res.statusCode}: ${text.slice(0, 300)}`);
    const headers = Object.fromEntries(Object.entries(res.headers || {}).map(([k, v]) => [k.toLowerCase(), v]));
    check(!headers['x-fc-error-type'], `function error ${headers['x-fc-error-type']}: ${text.slice(0, 300)}`);
    check(!!headers['x-fc-request-id'], 'x-fc-request-id missing');
    if (args.expect !== undefined) {
      check(text.includes(args.expect), `${JSON.stringify(args.expect)} not in ${JSON.stringify(text.slice(0, 300))}`);
    } else {
      const result = JSON.parse(text);
      if ('echo' in result) { // examples/hello-python
        check(result.echo === args.payload, `echo ${JSON.stringify(result.echo)}`);
        check(result.functionName === args.name, `functionName ${result.functionName}`);
        check(result.memory === '1024', `memory ${result.memory} (update not applied?)`);
        check(result.env === updated, `env ${result.env}`);
      }
    }
    return `${res.statusCode} request-id=${headers['x-fc-request-id']} body=${text.slice(0, 120)}`;
  };

  const callEnv = async (qualifier) => {
    const res = await client.invokeFunctionWithOptions(
      args.name,
      new fc.InvokeFunctionRequest({ qualifier, body: new dara.BytesReadable(Buffer.from(args.payload)) }),
      new fc.InvokeFunctionHeaders({ xFcInvocationType: 'Sync' }),
      new dara.RuntimeOptions({}),
    );
    const text = (await dara.Stream.readAsBytes(res.body)).toString('utf8');
    check(res.statusCode === 200, `${qualifier}: status ${res.statusCode}: ${text.slice(0, 300)}`);
    const result = JSON.parse(text);
    return 'echo' in result ? result.env : undefined;
  };

  const download = (url) => new Promise((resolve, reject) => {
    https.get(url, { ca: cred.caCert ? readFileSync(cred.caCert, 'utf8') : undefined }, (res) => {
      const chunks = [];
      res.on('data', (c) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode, body: Buffer.concat(chunks) }));
    }).on('error', reject);
  });

  const versions = async () => {
    const v1 = (await client.publishFunctionVersion(args.name, new fc.PublishFunctionVersionRequest({
      body: new fc.PublishVersionInput({ description: 'first' }),
    }))).body;
    check(v1.versionId === '1' && v1.description === 'first', `version ${JSON.stringify(v1)}`);
    await client.updateFunction(args.name, new fc.UpdateFunctionRequest({
      body: new fc.UpdateFunctionInput({ environmentVariables: { GREETING: 'version two' } }),
    }));
    const v2 = (await client.publishFunctionVersion(args.name, new fc.PublishFunctionVersionRequest({
      body: new fc.PublishVersionInput({}),
    }))).body;
    check(v2.versionId === '2', `version ${JSON.stringify(v2)}`);
    const listed = (await client.listFunctionVersions(args.name, new fc.ListFunctionVersionsRequest({}))).body;
    check(JSON.stringify(listed.versions.map((v) => v.versionId)) === '["2","1"]', `versions ${JSON.stringify(listed)}`);
    const alias = (await client.createAlias(args.name, new fc.CreateAliasRequest({
      body: new fc.CreateAliasInput({ aliasName: 'prod', versionId: '1', additionalVersionWeight: { 2: 0.5 } }),
    }))).body;
    check(alias.additionalVersionWeight['2'] === 0.5, `alias ${JSON.stringify(alias)}`);
    // The alias's own async invoke config.
    const cfg = (await client.putAsyncInvokeConfig(args.name, new fc.PutAsyncInvokeConfigRequest({
      qualifier: 'prod', body: new fc.PutAsyncInvokeConfigInput({ maxAsyncRetryAttempts: 1 }),
    }))).body;
    check(cfg.functionArn.endsWith('/aliases/prod') && cfg.maxAsyncRetryAttempts === 1,
      `async config ${JSON.stringify(cfg)}`);
    await client.deleteAsyncInvokeConfig(args.name, new fc.DeleteAsyncInvokeConfigRequest({ qualifier: 'prod' }));
    // ... and its own provision configuration.
    const prov = (await client.putProvisionConfig(args.name, new fc.PutProvisionConfigRequest({
      qualifier: 'prod', body: new fc.PutProvisionConfigInput({ target: 1 }),
    }))).body;
    check(prov.functionArn.endsWith('/aliases/prod') && prov.defaultTarget === 1,
      `provision config ${JSON.stringify(prov)}`);
    const gotProv = (await client.getProvisionConfig(args.name, new fc.GetProvisionConfigRequest({ qualifier: 'prod' }))).body;
    check(gotProv.defaultTarget === 1, `GetProvisionConfig ${JSON.stringify(gotProv)}`);
    await client.deleteProvisionConfig(args.name, new fc.DeleteProvisionConfigRequest({ qualifier: 'prod' }));
    // examples/hello-python answers with its environment: each version's own.
    const envs = {};
    for (const q of ['1', '2', 'LATEST']) envs[q] = await callEnv(q);
    const hello = envs['1'] !== undefined;
    if (hello) {
      check(envs['1'] === updated && envs['2'] === 'version two' && envs.LATEST === 'version two',
        `each version's environment: ${JSON.stringify(envs)}`);
    }
    const split = new Set();
    for (let i = 0; i < 40; i++) split.add(await callEnv('prod'));
    if (hello) check(split.size === 2, `alias split ${[...split]}`);
    const codeOut = (await client.getFunctionCode(args.name, new fc.GetFunctionCodeRequest({ qualifier: '1' }))).body;
    const got = await download(codeOut.url);
    check(got.status === 200 && got.body.equals(code), `code download ${got.status}`);
    const rolled = (await client.updateAlias(args.name, 'prod', new fc.UpdateAliasRequest({
      body: new fc.UpdateAliasInput({ versionId: '2', additionalVersionWeight: {} }),
    }))).body;
    check(rolled.versionId === '2', `alias ${JSON.stringify(rolled)}`);
    if (hello) {
      for (let i = 0; i < 10; i++) check(await callEnv('prod') === 'version two', 'a call after the roll ran version 1');
    }
    check((await client.getAlias(args.name, 'prod')).body.versionId === '2', 'GetAlias');
    const aliases = (await client.listAliases(args.name, new fc.ListAliasesRequest({}))).body.aliases;
    check(JSON.stringify(aliases.map((a) => a.aliasName)) === '["prod"]', `aliases ${JSON.stringify(aliases)}`);
    try {
      await client.deleteFunctionVersion(args.name, '2');
      throw new Error('deleted the version an alias uses');
    } catch (e) {
      if (!(e instanceof openapiModule.ClientError)) throw e;
      check(e.code === 'InvalidArgument', `code ${e.code}`);
    }
    await client.deleteAlias(args.name, 'prod');
    for (const v of ['1', '2']) await client.deleteFunctionVersion(args.name, v);
    return `versions 1, 2; alias split ${JSON.stringify([...split])}; code ${code.length} bytes`;
  };

  // FC's tags on the function: TagResources, ListTagResources (by id),
  // UntagResources.
  const tags = async () => {
    const arn = (await client.getFunction(args.name, new fc.GetFunctionRequest({}))).body.functionArn;
    await client.tagResources(new fc.TagResourcesRequest({
      body: new fc.TagResourcesInput({
        resourceType: 'function', resourceId: [arn], tag: [new fc.Tag({ key: 'team', value: 'node' })],
      }),
    }));
    const rows = async () => ((await client.listTagResources(new fc.ListTagResourcesRequest({
      resourceType: 'function', resourceId: [arn],
    }))).body.tagResources || []).map((r) => `${r.tagKey}=${r.tagValue}`);
    const listed = await rows();
    check(JSON.stringify(listed) === '["team=node"]', `tags ${JSON.stringify(listed)}`);
    await client.untagResources(new fc.UntagResourcesRequest({
      resourceType: 'function', resourceId: [arn], tagKey: ['team'],
    }));
    check((await rows()).length === 0, 'UntagResources left a tag');
    return `tagged and untagged ${arn}`;
  };

  // An HTTP trigger (anonymous) answered at its URL, and a timer trigger;
  // Create/Get/List/Update/DeleteTrigger. The trigger's host resolves to
  // the gateway (a name under localhost), reached here by address with
  // the host name as SNI and Host.
  const triggers = async () => {
    const http = (await client.createTrigger(args.name, new fc.CreateTriggerRequest({
      body: new fc.CreateTriggerInput({
        triggerName: 'web', triggerType: 'http',
        triggerConfig: JSON.stringify({ authType: 'anonymous', methods: ['GET', 'POST'] }),
      }),
    }))).body;
    const url = new URL(http.httpTrigger.urlInternet);
    const gateway = new URL(cred.endpoint.includes('://') ? cred.endpoint : `https://${cred.endpoint}`);
    const answer = await new Promise((resolve, reject) => {
      https.get({
        host: gateway.hostname, port: url.port || gateway.port, path: '/hello?x=1',
        servername: url.hostname, headers: { Host: url.host },
        ca: cred.caCert ? readFileSync(cred.caCert, 'utf8') : undefined,
      }, (res) => {
        const chunks = [];
        res.on('data', (c) => chunks.push(c));
        res.on('end', () => resolve({ status: res.statusCode, body: Buffer.concat(chunks).toString() }));
      }).on('error', reject);
    });
    // The function's own answer, whatever it is: examples/hello-python
    // serves no GET path and says which one it got, query included.
    check(answer.body.includes('/hello?x=1'), `trigger answered ${answer.status} ${answer.body}`);
    const got = (await client.getTrigger(args.name, 'web')).body;
    check(got.triggerType === 'http' && got.httpTrigger.urlInternet === http.httpTrigger.urlInternet,
      `GetTrigger ${JSON.stringify(got)}`);
    await client.updateTrigger(args.name, 'web', new fc.UpdateTriggerRequest({
      body: new fc.UpdateTriggerInput({ description: 'from node' }),
    }));
    await client.createTrigger(args.name, new fc.CreateTriggerRequest({
      body: new fc.CreateTriggerInput({
        triggerName: 'tick', triggerType: 'timer',
        triggerConfig: JSON.stringify({ cronExpression: '@every 60m', payload: 'tick', enable: false }),
      }),
    }));
    const listed = (await client.listTriggers(args.name, new fc.ListTriggersRequest({}))).body.triggers;
    check(JSON.stringify(listed.map((t) => `${t.triggerName}:${t.triggerType}`)) === '["tick:timer","web:http"]',
      `ListTriggers ${JSON.stringify(listed.map((t) => t.triggerName))}`);
    check(listed.find((t) => t.triggerName === 'web').description === 'from node', 'UpdateTrigger');
    for (const t of ['web', 'tick']) await client.deleteTrigger(args.name, t);
    return `${url.host} answered ${answer.status} from the function; timer listed; both deleted`;
  };

  // DisableFunctionInvocation refuses calls until EnableFunctionInvocation.
  const disable = async () => {
    const off = (await client.disableFunctionInvocation(args.name, new fc.DisableFunctionInvocationRequest({
      reason: 'node sdk', abortOngoingRequest: false,
    }))).body;
    check(off.success === true, `disable ${JSON.stringify(off)}`);
    const f = (await client.getFunction(args.name, new fc.GetFunctionRequest({}))).body;
    check(f.invocationRestriction && f.invocationRestriction.disable === true
      && f.invocationRestriction.reason === 'node sdk', `restriction ${JSON.stringify(f.invocationRestriction)}`);
    try {
      await client.invokeFunction(args.name, new fc.InvokeFunctionRequest({
        body: new dara.BytesReadable(Buffer.from(args.payload)),
      }));
      throw new Error('a disabled function was invoked');
    } catch (e) {
      if (!(e instanceof openapiModule.ClientError)) throw e;
      check(e.code === 'FunctionInvocationDisabled', `code ${e.code}`);
    }
    const on = (await client.enableFunctionInvocation(args.name)).body;
    check(on.success === true, `enable ${JSON.stringify(on)}`);
    const res = await client.invokeFunction(args.name, new fc.InvokeFunctionRequest({
      body: new dara.BytesReadable(Buffer.from(args.payload)),
    }));
    await dara.Stream.readAsBytes(res.body);
    check(res.statusCode === 200, `invoke after enable ${res.statusCode}`);
    return 'refused while disabled, invoked after enable';
  };

  // Custom domains (when the test hands a domain's certificate and key:
  // KILN_SDK_DOMAIN, KILN_SDK_DOMAIN_CERT, KILN_SDK_DOMAIN_KEY):
  // Create/Get/List/Update/DeleteCustomDomain; the key never comes back.
  const domains = async () => {
    const domain = process.env.KILN_SDK_DOMAIN;
    if (!domain) return 'skipped: no KILN_SDK_DOMAIN certificate given';
    const route = (methods) => new fc.RouteConfig({
      routes: [new fc.PathConfig({ path: '/*', functionName: args.name, qualifier: 'LATEST', methods })],
    });
    const made = (await client.createCustomDomain(new fc.CreateCustomDomainRequest({
      body: new fc.CreateCustomDomainInput({
        domainName: domain,
        protocol: 'HTTPS',
        certConfig: new fc.CertConfig({
          certName: 'node-sdk',
          certificate: readFileSync(process.env.KILN_SDK_DOMAIN_CERT, 'utf8'),
          privateKey: readFileSync(process.env.KILN_SDK_DOMAIN_KEY, 'utf8'),
        }),
        routeConfig: route(['GET']),
      }),
    }))).body;
    check(made.domainName === domain && made.certConfig && !made.certConfig.privateKey,
      `created ${JSON.stringify(made)}`);
    const got = (await client.getCustomDomain(domain)).body;
    check(got.routeConfig.routes[0].functionName === args.name, `GetCustomDomain ${JSON.stringify(got)}`);
    const listed = (await client.listCustomDomains(new fc.ListCustomDomainsRequest({}))).body;
    check((listed.customDomains || []).some((d) => d.domainName === domain), `ListCustomDomains ${JSON.stringify(listed)}`);
    await client.updateCustomDomain(domain, new fc.UpdateCustomDomainRequest({
      body: new fc.UpdateCustomDomainInput({ routeConfig: route(['GET', 'POST']) }),
    }));
    const updated = (await client.getCustomDomain(domain)).body;
    check(JSON.stringify(updated.routeConfig.routes[0].methods) === '["GET","POST"]',
      `UpdateCustomDomain ${JSON.stringify(updated.routeConfig)}`);
    await client.deleteCustomDomain(domain);
    try {
      await client.getCustomDomain(domain);
      throw new Error('a deleted domain was found');
    } catch (e) {
      if (!(e instanceof openapiModule.ClientError)) throw e;
      check(e.code === 'DomainNameNotFound', `code ${e.code}`);
    }
    return `${domain} created, read, listed, updated, deleted`;
  };

  const dropVersions = async (name) => {
    const aliases = (await client.listAliases(name, new fc.ListAliasesRequest({}))).body.aliases || [];
    for (const a of aliases) await client.deleteAlias(name, a.aliasName);
    const vs = (await client.listFunctionVersions(name, new fc.ListFunctionVersionsRequest({}))).body.versions || [];
    for (const v of vs) await client.deleteFunctionVersion(name, v.versionId);
  };

  const del = async (name) => {
    const res = await client.deleteFunction(name);
    created.delete(name);
    check(res.statusCode === 200 || res.statusCode === 204, `status ${res.statusCode}`);
    return `${name} status=${res.statusCode}`;
  };

  const getDeleted = async () => {
    try {
      await client.getFunction(args.name, new fc.GetFunctionRequest({}));
    } catch (e) {
      if (!(e instanceof openapiModule.ClientError)) throw e;
      check(e.statusCode === 404, `status ${e.statusCode}`);
      check(e.code === 'FunctionNotFound', `code ${e.code}`);
      const data = e.data || {};
      check(['Code', 'Message', 'RequestId'].every((k) => data[k]), `error body ${JSON.stringify(data)}`);
      return `${e.statusCode} ${e.code}: ${data.Message} (RequestId ${data.RequestId})`;
    }
    throw new Error('GetFunction of a deleted function succeeded');
  };

  try {
    await step('CreateFunction', () => create(names[0], greeting));
    await step('CreateFunction (second, same prefix)', () => create(names[1], 'second'));
    await step('GetFunction', get);
    await step('ListFunctions', listAll);
    await step('UpdateFunction', update);
    await step('InvokeFunction', invoke);
    await step('Versions and aliases', versions);
    await step('Tags', tags);
    await step('HTTP and timer triggers', triggers);
    await step('Disable and enable invocation', disable);
    await step('Custom domains', domains);
    for (const name of names) {
      await step('DeleteFunction', () => del(name));
    }
    await step('GetFunction after delete', getDeleted);
  } catch (e) {
    if (!(e instanceof StepFailed)) throw e;
    for (const name of created) {
      try {
        await dropVersions(name);
        await client.deleteFunction(name);
      } catch (cleanup) {
        console.log(`     cleanup of ${name} failed: ${cleanup.message}`);
      }
    }
    return 1;
  }
  console.log('ok   all steps passed');
  return 0;
}

main().then((code) => process.exit(code), (e) => {
  console.log(`FAIL ${e && e.stack}`);
  process.exit(1);
});
