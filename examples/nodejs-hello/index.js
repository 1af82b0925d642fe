'use strict';
// A Kiln function on the built-in `nodejs18` runtime: FC's event handler
// model, no HTTP server of its own.
//
// Deploy:  kiln deploy --name js-hello --runtime nodejs18 examples/nodejs-hello
// Invoke:  kiln invoke js-hello --data '{"name": "Kiln"}'
//
// `handler` is FC's async form; `callbackHandler` (handler
// "index.callbackHandler") the callback form. An event {"fail": "..."}
// throws, which the caller sees as FC's error body (errorMessage,
// errorType, stackTrace) with x-fc-error-type UnhandledInvocationError.
// Configure `initialize` as the initializer
// (instanceLifecycleConfig.initializer.handler = "index.initialize") and it
// runs once per instance, before the first call; `preStop` as the PreStop
// hook (instanceLifecycleConfig.preStop.handler = "index.preStop") runs
// before the instance goes away. Through an HTTP trigger the event is FC
// 3.0's HTTP trigger event; the path /shaped answers in FC's HTTP response
// shape.

const initialized = [];

exports.initialize = async (context) => {
  initialized.push(context.requestId);
  context.logger.info('initializer ran');
};

exports.preStop = async (context) => {
  context.logger.info(`pre-stop ran after ${initialized.length} initializer run(s)`);
};

function answer(event, context) {
  const data = JSON.parse(event.toString() || '{}');
  console.log(`hello from ${context.function.name}`);
  if (data.fail) throw new RangeError(data.fail);
  // Through an HTTP trigger the event is FC 3.0's HTTP event; its path
  // /shaped asks for an answer in FC's response shape.
  if (data.rawPath === '/shaped') {
    return {
      statusCode: 201,
      headers: { 'x-shaped': 'yes', 'content-type': 'text/plain' },
      isBase64Encoded: true,
      body: Buffer.from('shaped').toString('base64'),
    };
  }
  const c = context.credentials;
  return {
    event: data,
    requestId: context.requestId,
    function: {
      name: context.function.name,
      handler: context.function.handler,
      memory: context.function.memory,
      timeout: context.function.timeout,
    },
    region: context.region,
    accountId: context.accountId,
    hasCredentials: Boolean(c.accessKeyId && c.accessKeySecret && c.securityToken),
    initializerRuns: initialized.length,
    isBuffer: Buffer.isBuffer(event),
  };
}

exports.handler = async (event, context) => answer(event, context);

exports.callbackHandler = (event, context, callback) => {
  let result;
  try {
    result = answer(event, context);
  } catch (e) {
    callback(e);
    return;
  }
  setImmediate(() => callback(null, result));
};
